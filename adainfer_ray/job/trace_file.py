"""The calibration sample's trace on disk (<policy folder>/trace.safetensors): every layer's exit
features of the sample, its gold labels and groups, and what calibrate.calibrate needs besides
(model dims, prefix length, label count, provenance), so that a policy can be refit with another
--epsilon/--delta/--promise in seconds, without running the model again. Plain arrays + JSON
metadata (safetensors): no pickle, no code runs on load."""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass

import numpy as np

from adainfer_ray import io

TRACE_FILE = "trace.safetensors"


@dataclass
class SavedTrace:
    trace: dict  # {feature: [n, L] / [n, L, D] / [n]} as calibrate.calibrate takes it
    gold: np.ndarray  # [n] label indices, -1 where unknown
    groups: np.ndarray | None  # [n] group codes, None when the sample was not grouped
    dims: object  # flops.ModelDims
    prefix_tokens: int
    num_labels: int
    provenance: dict


def save_trace(folder: str, saved: SavedTrace) -> str:
    """Write `saved` to <folder>/trace.safetensors (local or fsspec); returns its path."""
    from safetensors.numpy import save

    arrays = {"trace." + k: np.ascontiguousarray(v) for k, v in saved.trace.items()}
    arrays["gold"] = np.asarray(saved.gold, np.int64)
    if saved.groups is not None:  # group keys are any values: their codes keep who is with whom
        arrays["groups"] = np.unique(np.asarray(saved.groups).astype(str), return_inverse=True)[1].astype(np.int64)
    meta = {"dims": json.dumps(asdict(saved.dims)), "prefix_tokens": str(saved.prefix_tokens),
            "num_labels": str(saved.num_labels), "provenance": json.dumps(saved.provenance, default=str)}
    fs, root = io.output_fs(folder)
    fs.makedirs(root, exist_ok=True)
    path = posixpath.join(root, TRACE_FILE)
    with fs.open(path, "wb") as f:
        f.write(save(arrays, metadata=meta))
    return path


def load_trace(folder: str) -> SavedTrace:
    """Read <folder>/trace.safetensors back (FileNotFoundError names the file when it is absent)."""
    from adainfer_ray.flops import ModelDims

    fs, root = io.output_fs(folder)
    path = posixpath.join(root, TRACE_FILE)
    if not fs.exists(path):
        raise FileNotFoundError(f"{folder} holds no {TRACE_FILE}: only a policy calibrated by this version "
                                "(jobs/calibrate.py or classify --calibrate) can be refit; calibrate it again")
    from safetensors.numpy import load

    with fs.open(path, "rb") as f:
        data = f.read()
    arrays = load(data)
    meta = _metadata(data)
    return SavedTrace(trace={k[len("trace."):]: v for k, v in arrays.items() if k.startswith("trace.")},
                      gold=arrays["gold"], groups=arrays.get("groups"),
                      dims=ModelDims(**json.loads(meta["dims"])), prefix_tokens=int(meta["prefix_tokens"]),
                      num_labels=int(meta["num_labels"]), provenance=json.loads(meta["provenance"]))


def _metadata(data: bytes) -> dict:
    """The safetensors header's __metadata__ (a JSON header after an 8-byte little-endian length)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8: 8 + size]).get("__metadata__", {})
