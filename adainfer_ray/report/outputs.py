"""Finding and reading a run's output through fsspec: its Parquet files, batch by batch, and its sidecar."""

from __future__ import annotations

import json
import posixpath
from typing import Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from adainfer_ray.schema import OUTPUT_SCHEMA, SIDECAR_NAME

# Reading: column chunks are streamed through a small buffer (pre_buffer off) and handed over
# BATCH_ROWS rows at a time, so that memory in flight hardly grows with the row-group size the
# writer chose (measured on one 2M-row row group: about 25 MB of Arrow memory this way, about
# 105 MB with pyarrow's defaults).
BATCH_ROWS = 16_384
READ_BUFFER_BYTES = 1 << 20


def _is_hidden(relative_path: str) -> bool:
    """Files or folders starting with `_` or `.` are metadata, temporary or partial files."""
    return any(part.startswith(("_", ".")) for part in relative_path.split("/") if part)


def find_parquet_files(uri: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem of `uri` and the Parquet files in it (or `uri` itself, if it is a file).

    Skips anything whose path below `uri` has a part starting with `_` or `.`. Sorted, so that
    reports are reproducible.
    """
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/") or "/"
    if fs.isfile(root):
        return fs, [root]
    files = []
    for path in fs.find(root):
        relative = path[len(root):] if path.startswith(root) else posixpath.basename(path)
        if path.endswith(".parquet") and not _is_hidden(relative):
            files.append(path)
    return fs, sorted(files)


def read_sidecar(uri: str) -> dict | None:
    """The run sidecar next to the output (`_run.json`), or None when there is none."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/") or "/"
    folder = posixpath.dirname(root) if fs.isfile(root) else root
    path = posixpath.join(folder, SIDECAR_NAME)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.load(f)


def iter_batches(uris: Iterable[str], columns: list[str],
                 batch_size: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Yield RecordBatches of `columns` from every Parquet file of every uri, one at a time.

    Columns a file lacks are absent from its batches; `column` treats them as all-null.
    """
    for uri in uris:
        fs, files = find_parquet_files(uri)
        for path in files:
            with fs.open(path, "rb") as f:
                parquet_file = pq.ParquetFile(f, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
                present = [c for c in columns if c in parquet_file.schema_arrow.names]
                yield from parquet_file.iter_batches(batch_size=batch_size, columns=present)


def column(batch: pa.RecordBatch, name: str) -> pa.Array:
    """A column of the batch ([n]), or an all-null one of the contract's type if the file lacks it."""
    index = batch.schema.get_field_index(name)
    if index < 0:
        return pa.nulls(batch.num_rows, type=OUTPUT_SCHEMA.field(name).type)
    return batch.column(index)


def numbers(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A numeric column as float64, with NaN for nulls."""
    return column(batch, name).cast(pa.float64()).to_numpy(zero_copy_only=False)


def is_valid(array: pa.Array) -> np.ndarray:
    """[n] True where the array holds a value."""
    return array.is_valid().to_numpy(zero_copy_only=False)

