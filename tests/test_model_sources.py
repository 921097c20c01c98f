"""Where models come from (Hub cache, fsspec URI, GGUF file), the cached fingerprint, and precision."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adainfer_ray.models import load_model, model_fingerprint, pick_device, resolve_model_dir
from adainfer_ray.models import sources  # private names are patched where they are looked up

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAINFER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@torch.no_grad()
def last_logits(lm, ids):
    return lm.head(lm.run_all(torch.tensor([ids])))[0]


def hub_cache(root: Path, repo: str, src: Path) -> str:
    """The huggingface_hub cache layout for `repo`, built by hand from a saved model folder:
    blobs named by their sha256, a snapshot of symlinks to them, and refs/main -> the commit."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = base / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return commit


def test_hub_id_loads_from_a_prepopulated_cache_offline(tiny_model_dir, tmp_path):
    """`org/name`, `org/name@commit` through HF_HOME's hub cache with HF_HUB_OFFLINE=1; a missing id
    fails in one line that says what to do. A fresh process, as users set these before starting."""
    commit = hub_cache(tmp_path / "hf" / "hub", "tiny-org/tiny-llama", tiny_model_dir)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", ADAINFER_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_CACHE", None)
    script = f"""
import json
from adainfer_ray.models import load_model
out = {{}}
for name in ("tiny-org/tiny-llama", "tiny-org/tiny-llama@{commit}"):
    lm = load_model(name, device="cpu")
    out[name] = [lm.model_id, lm.num_layers, lm.model_hash, lm.head(lm.run_all(__import__("torch").tensor([[5, 6, 7]]))).sum().item()]
try:
    load_model("tiny-org/not-cached", device="cpu")
except FileNotFoundError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    local = load_model(str(tiny_model_dir), device="cpu")
    expect = last_logits(local, [5, 6, 7]).sum().item()
    for name in ("tiny-org/tiny-llama", f"tiny-org/tiny-llama@{commit}"):
        model_id, layers, fingerprint, logit_sum = out[name]
        assert model_id == name and layers == 4 and fingerprint == local.model_hash
        assert logit_sum == pytest.approx(expect, abs=1e-3)
    assert "not in the Hugging Face cache" in out["error"] and "hf download tiny-org/not-cached" in out["error"]
    assert "\n" not in out["error"]


def test_fsspec_uri_is_copied_once_into_the_cache(tiny_model_dir, own_cache):
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in tiny_model_dir.iterdir():
        fs.pipe(f"/models/tiny/{f.name}", f.read_bytes())
    got = resolve_model_dir("memory://models/tiny")
    assert got.parent == own_cache / "models" and (got / "config.json").exists()
    assert model_fingerprint(got) == model_fingerprint(tiny_model_dir)
    fs.rm("/models/tiny", recursive=True)  # a second resolve reads the copy, not the URI
    assert resolve_model_dir("memory://models/tiny") == got


@pytest.mark.parametrize("name", ["../escape.json", "a/../../escape.json", "/etc/escape.json"])
def test_a_remote_key_cannot_escape_the_cache(own_cache, monkeypatch, name):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    fsspec.filesystem("memory").pipe("/evil/config.json", b"{}")
    root = "/evil"
    monkeypatch.setattr(MemoryFileSystem, "find", lambda self, path, **kw: [f"{root}/config.json", f"{root}/{name}"
                                                                            if not name.startswith("/") else name])
    with pytest.raises(ValueError, match="outside the model folder"):
        resolve_model_dir("memory://evil")
    assert not any(p.name == "escape.json" for p in own_cache.parent.rglob("*"))
    assert not [p for p in (own_cache / "models").iterdir()]  # the partial copy is gone


def write_gguf(path: Path, hf_dir: Path):
    """A llama GGUF (fp32 tensors) holding the weights of the HF model in `hf_dir`, written the way
    llama.cpp's converter does (q/k rows permuted), with the default GGUF's tokenizer metadata (the
    tiny model uses the same tokenizer)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)
    w = {k: v.float().numpy() for k, v in load_file(hf_dir / "model.safetensors").items()}
    reader = gguf.GGUFReader(sources.default_gguf_path())
    out = gguf.GGUFWriter(str(path), "llama")
    for f in reader.fields.values():
        if f.name.startswith(("tokenizer.", "general.name")):
            out.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    out.add_block_count(cfg.num_hidden_layers)
    out.add_context_length(cfg.max_position_embeddings)
    out.add_embedding_length(D)
    out.add_feed_forward_length(cfg.intermediate_size)
    out.add_head_count(H)
    out.add_head_count_kv(Hkv)
    out.add_rope_dimension_count(D // H)
    out.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    out.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    out.add_vocab_size(cfg.vocab_size)

    def permute(x, n):  # llama.cpp's rotary layout; transformers undoes it when reading
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    out.add_tensor("token_embd.weight", w["model.embed_tokens.weight"])
    out.add_tensor("output_norm.weight", w["model.norm.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.add_tensor(f"blk.{i}.attn_q.weight", permute(w[p + "self_attn.q_proj.weight"], H))
        out.add_tensor(f"blk.{i}.attn_k.weight", permute(w[p + "self_attn.k_proj.weight"], Hkv))
        for g, hf in names.items():
            out.add_tensor(f"blk.{i}.{g}.weight", w[p + hf + ".weight"])
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()


def test_gguf_file_is_converted_once_and_computes_the_same_model(tiny_model_dir, tmp_path, own_cache):
    import fsspec

    path = tmp_path / "tiny llama.gguf"  # a space: the cache folder name is sanitised
    write_gguf(path, tiny_model_dir)
    lm = load_model(str(path), device="cpu")
    ref = load_model(str(tiny_model_dir), device="cpu")
    ids = ref.tokenizer("Review: a warm, funny film.\nSentiment:")["input_ids"]
    assert lm.tokenizer("Review: a warm, funny film.\nSentiment:")["input_ids"] == ids
    assert torch.allclose(last_logits(lm, ids), last_logits(ref, ids), atol=1e-4)
    converted = resolve_model_dir(str(path))
    assert converted.parent == own_cache / "models" and " " not in converted.name
    mtime = (converted / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(str(path)) == converted  # converted once
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime
    fsspec.filesystem("memory").pipe("/gguf/tiny.gguf", path.read_bytes())  # and from a URI
    via_uri = load_model("memory://gguf/tiny.gguf", device="cpu")
    assert via_uri.model_hash == lm.model_hash


def test_fingerprint_is_cached_and_follows_the_weights(tiny_model_dir, tmp_path, own_cache, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    first = model_fingerprint(folder)
    assert first == model_fingerprint(tiny_model_dir)  # same bytes, same fingerprint
    assert len(list((own_cache / "fingerprints").glob("*.json"))) == 2  # one small JSON per model folder

    def no_reading(*a, **k):
        raise AssertionError("the weights were read again")

    # `open` as model_fingerprint looks it up: in sources' globals (patching the package would test nothing)
    monkeypatch.setattr(sources, "open", no_reading, raising=False)
    assert model_fingerprint(folder) == first  # from the cache: not a byte of the weights read
    monkeypatch.undo()
    monkeypatch.setenv("ADAINFER_CACHE", str(own_cache))
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, new content (and a new mtime)
    weights.write_bytes(bytes(data))
    assert model_fingerprint(folder) != first


def test_fingerprint_ignores_which_transformers_wrote_the_config(tiny_model_dir, tmp_path, own_cache):
    """A model converted or re-saved under another transformers release keeps its policies; a
    change to what the config says of the model does not."""
    def copy_with(name, **changes):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}, indent=1))
        return folder

    first = model_fingerprint(tiny_model_dir)
    assert model_fingerprint(copy_with("newer", transformers_version="9.99.0")) == first
    assert model_fingerprint(copy_with("other", rms_norm_eps=1e-3)) != first


def test_dtype_choice_and_its_validation(tiny_model_dir):
    assert pick_device("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert pick_device("cpu", "float16")[1] == torch.float16
    with pytest.raises(ValueError, match="--dtype must be one of auto, float32, bfloat16, float16"):
        load_model("/no/such/model", device="cpu", dtype="fp8")  # before any file is looked at
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and last_logits(lm, [5, 6, 7]).dtype == torch.bfloat16


SST2_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"


@pytest.mark.slow
def test_bf16_labels_agree_with_fp32_on_real_text(default_lm):
    """The bf16 path every GPU run takes, on CPU: the real default model, 40 real SST-2 dev
    sentences, full depth. Measured here: 40/40 (100%) agree on these 40, and 864/872 (99.1%) on
    all of SST-2 dev with the same code. The bound (90%) is deliberately loose."""
    from adainfer_ray.engine import EarlyExitEngine
    from adainfer_ray.io import read_rows
    from adainfer_ray.prompts import SENTIMENT, PromptEncoder

    if not SST2_DEV.exists():
        pytest.skip(f"{SST2_DEV} is not here")
    texts = next(read_rows(str(SST2_DEV), "tsv", "sentence")).column("text").to_pylist()[:40]
    bf16 = load_model(device="cpu", dtype="bfloat16")
    labels = []
    for lm in (default_lm, bf16):
        enc = PromptEncoder(SENTIMENT, lm.tokenizer, lm.max_context)
        b = enc.encode(texts)
        labels.append(EarlyExitEngine(lm, enc.label_token_ids, prefix_ids=b.prefix_ids).classify(b.item_ids)["label"])
    agree = float(np.mean(labels[0] == labels[1]))
    print(f"bf16 vs fp32 label agreement: {agree:.1%} of {len(texts)}")
    assert len(texts) == 40 and agree >= 0.9
