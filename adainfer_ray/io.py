"""Reading corpora and writing results through fsspec + pyarrow: local paths, globs, s3://, gs://, memory://.

Every reader yields pyarrow RecordBatches with the file's own columns plus `__row`, the row's
position in its file, so that rows without an id column still get a stable one: `<file>:<row>`, the
file named by its path relative to the input root (a folder, or the folder part of a glob), so that
`a/part-0.jsonl` and `b/part-0.jsonl` give different ids.
Schema checks run on the driver, before any actor starts, and name the columns that exist.
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

FORMATS = ("parquet", "jsonl", "csv", "tsv")
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
               ".csv": "csv", ".tsv": "tsv"}
ROW_COLUMN = "__row"


class InputError(ValueError):
    """Bad input the user can fix: a missing path, a wrong column, an unreadable file."""


def detect_format(path: str, fmt: str | None = None) -> str:
    if fmt and fmt != "auto":
        if fmt not in FORMATS:
            raise InputError(f"unknown --format {fmt!r}: choose from {', '.join(FORMATS)}")
        return fmt
    name = path.lower().removesuffix(".gz")
    for ext, found in _EXTENSIONS.items():
        if name.endswith(ext):
            return found
    raise InputError(f"cannot tell the format of {path} from its name: pass --format ({', '.join(FORMATS)})")


def list_files(uri: str | list[str]) -> tuple[fsspec.AbstractFileSystem, list[str], list[str]]:
    """Expand a path, folder, glob or URI (or several) into files; folders yield their data files.
    Returns (fs, files, roots): roots[i] is the folder that files[i] was found under (the folder
    itself, the part of a glob before its first wildcard, a file's own folder), for derived ids."""
    uris = [uri] if isinstance(uri, str) else list(uri)
    files, roots, fs = [], [], None
    for u in uris:
        fs, root = fsspec.core.url_to_fs(u)
        if any(ch in root for ch in "*?["):
            found = sorted(fs.glob(root))
            base = root[: min(root.index(ch) for ch in "*?[" if ch in root)].rsplit("/", 1)[0]
        elif fs.isdir(root):
            found = sorted(p for p in fs.find(root) if os.path.splitext(p.removesuffix(".gz"))[1].lower() in _EXTENSIONS
                           and not os.path.basename(p).startswith(("_", ".")))
            base = root
        elif fs.exists(root):
            found, base = [root], root.rstrip("/").rsplit("/", 1)[0]
        else:
            raise InputError(f"input {u} does not exist: check --input (a file, folder, glob or URI)")
        if not found:
            raise InputError(f"input {u} matches no data files ({', '.join(sorted(_EXTENSIONS))}): check --input")
        unstrip = fs.unstrip_protocol if "://" in u else str
        files += [unstrip(p) for p in found]
        roots += [unstrip(base)] * len(found)
    return fs, files, roots


def relative_name(path: str, root: str | None) -> str:
    """The name of a file in derived ids: its path under the input root, else its base name."""
    prefix = (root or "").rstrip("/") + "/"
    return path[len(prefix):] if root and path.startswith(prefix) else os.path.basename(path)


# The input schema every reader produces, whatever the file held: the classifier sees only this.
INPUT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("gold_label", pa.string()),
                          ("group", pa.string()), ("input_error", pa.string())])


def read_rows(path: str, fmt: str, text_column: str, id_column: str | None = None,
              label_column: str | None = None, group_column: str | None = None,
              columns: list[str] | None = None, root: str | None = None,
              batch_rows: int = 4096) -> Iterator[pa.Table]:
    """Stream one file as tables of INPUT_SCHEMA. A row whose text is not a string keeps its place
    with `input_error` set; rows without an id column get `<path under root>:<row number>` (see
    list_files; without a root, the file's base name). `columns` names the columns of a CSV/TSV
    file without a header row. Every input row yields exactly one row here: bad rows are marked,
    never dropped."""
    start, name = 0, relative_name(path, root)
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            for cols, n in _raw_batches(f, fmt, batch_rows, text_column, columns):
                texts, errors = _texts(cols.get(text_column), n, text_column)
                if "__error" in cols:  # a JSON line that did not parse
                    errors = [e or j for e, j in zip(errors, cols["__error"].to_pylist())]
                if id_column and id_column in cols:
                    ids = [None if v is None else _clean(str(v)) for v in cols[id_column].to_pylist()]
                    ids = [i if i is not None else f"{name}:{start + r}" for r, i in enumerate(ids)]
                else:
                    ids = [f"{name}:{start + r}" for r in range(n)]
                gold, group = (_strings(cols, c, n) for c in (label_column, group_column))
                start += n
                yield pa.table([ids, texts, gold, group, errors], schema=INPUT_SCHEMA)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as {fmt}: {e}; fix or remove that file and run the same command "
                         "again (rows already written are kept)") from e


def _strings(cols: dict, column: str | None, n: int) -> list:
    """An optional column's values as strings (None where missing)."""
    if not column or column not in cols:
        return [None] * n
    return [None if v is None else _clean(str(v)) for v in cols[column].to_pylist()]


def _texts(column, n: int, name: str) -> tuple[list, list]:
    """Text values as str (bytes decoded, invalid UTF-8 replaced), or None with an error."""
    if column is None:
        return [None] * n, [f"row has no {name!r} field"] * n
    texts, errors = [], []
    for v in column.to_pylist():
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        if v is None or isinstance(v, str):
            texts.append(v if v is None else _clean(v))
            errors.append(None)
        else:
            texts.append(None)
            errors.append(f"text is {type(v).__name__}, not a string")
    return texts, errors


def _clean(s: str) -> str:
    """A str that Arrow can store: a lone UTF-16 surrogate (JSON allows "\\ud800") becomes U+FFFD."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _is_empty(f) -> bool:
    """An empty file (after decompression) holds no rows and no header; rewinds otherwise."""
    if f.read(1):
        f.seek(0)
        return False
    return True


def _raw_batches(f, fmt: str, batch_rows: int, text_column: str | None = None,
                 columns: list[str] | None = None) -> Iterator[tuple[dict, int]]:
    """(columns by name, each with .to_pylist(); row count) per batch of the file."""
    if _is_empty(f):
        return
    if fmt in ("parquet", "csv", "tsv"):
        if fmt == "parquet":
            batches = pq.ParquetFile(f).iter_batches(batch_size=batch_rows)
        else:
            opts = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=fmt == "csv",
                                      quote_char=False if fmt == "tsv" else '"')
            # The text column is read as bytes, so that invalid UTF-8 is replaced per row (in _texts)
            # instead of failing the whole file.
            convert = pacsv.ConvertOptions(strings_can_be_null=True,
                                           column_types={text_column: pa.binary()} if text_column else None)
            read = pacsv.ReadOptions(block_size=1 << 22, column_names=columns)
            batches = pacsv.open_csv(f, parse_options=opts, read_options=read, convert_options=convert)
        for b in batches:
            yield dict(zip(b.schema.names, b.columns)), b.num_rows
    else:  # JSON lines, parsed one by one so that one bad line becomes one error row, not a dead file
        lines = []
        for raw in f:
            if raw.strip():
                lines.append(raw)
            if len(lines) == batch_rows:
                yield _json_batch(lines)
                lines = []
        if lines:
            yield _json_batch(lines)


def _json_line(raw: bytes) -> dict:
    """One JSON line as a dict. Invalid UTF-8 is replaced (U+FFFD), so such a row is still labeled."""
    return json.loads(raw.decode("utf-8", errors="replace").lstrip("\ufeff"))


def _json_batch(lines: list[bytes]) -> tuple[dict, int]:
    rows = []
    for raw in lines:
        try:
            row = _json_line(raw)
            rows.append(row if isinstance(row, dict) else {"__error": f"a JSON line must be an object, not {type(row).__name__}"})
        except json.JSONDecodeError as e:
            rows.append({"__error": f"invalid JSON line: {e}"})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    # Plain Python values column by column: a column of mixed types is fine here, checked per row later.
    return {k: _Values([r.get(k) for r in rows]) for k in keys}, len(rows)


class _Values(list):
    def to_pylist(self):
        return list(self)


def file_columns(path: str, fmt: str, columns: list[str] | None = None) -> list[str]:
    """The columns of one file, reading only its footer/header/first lines; [] for an empty file.
    `columns`: the names given for a headerless CSV/TSV file."""
    if columns and fmt in ("csv", "tsv"):
        return list(columns)
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            if _is_empty(f):
                return []
            if fmt == "parquet":
                return pq.ParquetFile(f).schema_arrow.names
            if fmt in ("csv", "tsv"):
                header = f.readline().decode("utf-8", "replace").rstrip("\r\n")
                return [c.strip().strip('"') for c in header.split("\t" if fmt == "tsv" else ",")]
            # JSON lines: the first line that is a JSON object (a bad line is one error row, not a bad file)
            lines = list(itertools.islice((raw for raw in f if raw.strip()), 100))
            for raw in lines:
                try:
                    row = _json_line(raw)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    return list(row)
            if lines:
                raise ValueError("none of its first lines is a JSON object")
            return []
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise InputError(f"cannot read {path} as {fmt}: {e}; fix or remove that file, "
                         "or pass --format if it is not " + fmt) from e


def check_columns(files: list[str], fmt: str, required: dict[str, str], optional: dict[str, str],
                  columns: list[str] | None = None) -> dict[str, bool]:
    """Fail fast, naming the columns that exist, when a required column is missing from any file.
    required/optional map a flag name to a column name; returns which optional columns are present."""
    present = {flag: True for flag in optional}
    for path in files:
        cols = file_columns(path, fmt, columns)
        if not cols:
            continue  # an empty file: nothing to check, nothing to label
        for flag, col in required.items():
            if col not in cols:
                raise InputError(f"{path} has no column {col!r} ({flag}); its columns are: {', '.join(cols)}")
        for flag, col in optional.items():
            present[flag] = present[flag] and col in cols
    return present


def estimate_rows(files: list[str], fmt: str, sample_bytes: int = 1 << 24) -> int:
    """About how many rows the input holds, cheaply: exact from Parquet footers; for text formats,
    line counts, extrapolated from the first `sample_bytes` of a file when it is larger. It sizes
    the audit sample, where an estimate is enough."""
    total = 0
    for path in files:
        fs, p = fsspec.core.url_to_fs(path)
        with fsspec.open(path, "rb", compression="infer") as f:
            if _is_empty(f):
                continue
            if fmt == "parquet":
                total += pq.ParquetFile(f).metadata.num_rows
                continue
            head = f.read(sample_bytes)
            lines = head.count(b"\n") + (not head.endswith(b"\n"))
            whole = len(head) < sample_bytes or path.endswith(".gz")  # .gz: its size says little; count the head
            total += lines if whole else int(lines * fs.size(p) / len(head))
    return total


# -- output ----------------------------------------------------------------------------------------


def output_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(uri)
    return fs, root


def check_writable(uri: str) -> None:
    """Create the output folder and prove we can write there, before any work starts."""
    fs, root = output_fs(uri)
    probe = f"{root.rstrip('/')}/.write-test-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except (OSError, PermissionError) as e:
        raise InputError(f"cannot write to output {uri}: {e}; pick another --output or fix its permissions") from e


def output_files(uri: str) -> list[str]:
    fs, root = output_fs(uri)
    if not fs.exists(root):
        return []
    # Not under a folder named _x or .x either: resume moves damaged files aside into _quarantine/.
    base = root.rstrip("/") + "/"
    return sorted(p for p in fs.find(root) if p.endswith(".parquet")
                  and not any(part.startswith((".", "_")) for part in p.removeprefix(base).split("/")))


def write_parquet(uri: str, name: str, table: pa.Table) -> str:
    fs, root = output_fs(uri)
    path = f"{root.rstrip('/')}/{name}"
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    return path


def write_json(uri: str, name: str, payload: dict) -> str:
    fs, root = output_fs(uri)
    path = f"{root.rstrip('/')}/{name}"
    with fs.open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    return path
