"""Loading: the one place that joins a source (`sources.resolve_model_dir`: a local folder of
weights) to a family (`layers.family_of`), on a device and in a dtype."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from adainfer_ray.models.errors import UnsupportedModelError
from adainfer_ray.models.layers import DecoderLM, family_of
from adainfer_ray.models.sources import model_fingerprint, model_id, resolve_model_dir

DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_device(device: str | None = None, dtype: str | None = "auto") -> tuple[torch.device, torch.dtype]:
    """The device, and the weights' dtype: `auto` is CUDA with bf16 (fp16 on GPUs without bf16), CPU with fp32."""
    if dtype in (None, ""):
        dtype = "auto"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return dev, weights_dtype(dev.type, dtype)


def weights_dtype(device_type: str, dtype: str) -> torch.dtype:
    """The one rule for --dtype: `auto` is fp32 on CPU, bf16 on CUDA, fp16 on a GPU without bf16.
    The job records the dtype it runs at from here too, so the record matches the weights."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device_type == "cuda":
        # A driver that sees no GPU (a CPU head node) cannot ask the workers' GPUs: it assumes bf16.
        bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float16
    return torch.float32


def check_model_dir(model_dir: Path, trust_remote_code: bool = False):
    """The model folder's config, after the checks that keep a model folder data: one that names its
    own Python classes (auto_map) is refused without trust_remote_code, and an unsupported family
    fails here, before any weights load. The driver's preflight and load_model both come here."""
    from transformers import AutoConfig

    for name in ("config.json", "tokenizer_config.json"):
        try:
            meta = json.loads((model_dir / name).read_text()) if (model_dir / name).exists() else {}
        except ValueError as e:
            raise UnsupportedModelError(f"{model_dir / name} is not valid JSON ({e}): is --model a Hugging Face "
                                        "model folder?") from e
        if meta.get("auto_map") and not trust_remote_code:
            raise UnsupportedModelError(f"{model_dir} asks to run its own Python code (auto_map in {name}): "
                                        "refused; pass --trust-remote-code only if you trust its source")
        if name == "config.json" and meta:  # before AutoConfig, which knows fewer families than it names
            family_of(meta.get("model_type", "?"))
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)




def wrap_model(model, tokenizer, model_id: str = "custom", model_hash: str = "") -> DecoderLM:
    """Wrap an already-built HF causal LM (tests build tiny random ones from a config)."""
    cfg = model.config
    if cfg.model_type == "gpt2" and (cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn):
        raise UnsupportedModelError("GPT-2 variants with per-layer attention scaling are not supported")
    if getattr(cfg.get_text_config(), "use_bidirectional_attention", False):
        raise UnsupportedModelError("bidirectional (embedding) variants are not decoders: not supported")
    return family_of(cfg.model_type)(model.eval(), tokenizer, model_id, model_hash)


@contextlib.contextmanager
def quiet_weight_loading():
    """transformers' per-file progress bars off while weights load, as they were afterwards."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_model(name_or_uri: str | None = None, device: str | None = None, dtype: str = "auto",
               trust_remote_code: bool = False) -> DecoderLM:
    """Load `name_or_uri` (default: the embedded SmolLM2-135M-Instruct) ready for layer-by-layer runs.
    dtype: one of DTYPES; `auto` is fp32 on CPU, bf16 (fp16 without bf16 support) on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, torch_dtype = pick_device(device, dtype)  # a bad --dtype fails before any file is read
    model_dir = resolve_model_dir(name_or_uri)
    config = check_model_dir(model_dir, trust_remote_code)  # a clear error before any weights load
    with quiet_weight_loading():  # one "Loading weights" bar per actor is noise in a job's log
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return wrap_model(model.to(dev), tokenizer, model_id(name_or_uri), model_fingerprint(model_dir))
