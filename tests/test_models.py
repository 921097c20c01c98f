"""Layer-by-layer execution reproduces each family's own forward, with and without a prefix cache."""

import pytest
import torch

from adainfer_ray.models import UnsupportedModelError, family_of, load_model
from conftest import build_tiny, random_items


def right_padded(items):
    T = max(map(len, items))
    ids = torch.zeros(len(items), T, dtype=torch.long)
    for b, x in enumerate(items):
        ids[b, : len(x)] = torch.tensor(x)
    return ids, torch.tensor([len(x) for x in items])


@torch.no_grad()
def test_all_layers_reproduce_hf_forward(tiny_lm):
    items = random_items(5, seed=1)
    ids, lens = right_padded(items)
    ours = tiny_lm.head(tiny_lm.run_all(ids, lens))
    for b, x in enumerate(items):  # the model's own forward, one unpadded prompt at a time
        ref = tiny_lm.model(torch.tensor([x])).logits[0, -1]
        assert torch.allclose(ours[b], ref, atol=1e-4), (b, (ours[b] - ref).abs().max())


@torch.no_grad()
def test_prefix_cache_matches_whole_prompt(tiny_lm):
    prefix, suffixes = random_items(1, seed=2, lo=10, hi=11)[0], random_items(4, seed=3)
    L = tiny_lm.num_layers
    pos = torch.arange(len(prefix))[None]
    h, cache = tiny_lm.embed(torch.tensor([prefix]), pos), []
    for i in range(L):
        h, kv = tiny_lm.layer(i, h, pos, return_kv=True)
        cache.append(kv)
    ids, lens = right_padded(suffixes)
    pos = (len(prefix) + torch.arange(ids.shape[1])).expand_as(ids)
    h = tiny_lm.embed(ids, pos)
    for i in range(L):
        h = tiny_lm.layer(i, h, pos, prefix_kv=cache[i])
    ours = tiny_lm.head(tiny_lm.final_norm(h[torch.arange(len(suffixes)), lens - 1]))
    for b, x in enumerate(suffixes):
        ref = tiny_lm.model(torch.tensor([prefix + x])).logits[0, -1]
        assert torch.allclose(ours[b], ref, atol=1e-4)


@torch.no_grad()
def test_packed_engine_steps_reproduce_hf_forward(tiny_lm):
    """The engine's layer steps (items of different lengths packed end to end, the prefix attended
    from its cache or run with each item) give the model's own answer, for every family and past
    sliding windows."""
    from adainfer_ray.engine import EarlyExitEngine

    prefix, items, label_ids = random_items(1, seed=11, lo=9, hi=10)[0], random_items(7, seed=12, lo=2, hi=30), [5, 9, 17]
    for reuse in (True, False):
        out = EarlyExitEngine(tiny_lm, label_ids, prefix_ids=prefix, reuse_prefix=reuse).classify(items)
        for i, x in enumerate(items):
            p = torch.softmax(tiny_lm.model(torch.tensor([prefix + x])).logits[0, -1, label_ids], -1)
            assert out["label"][i] == int(p.argmax())
            assert out["label_score"][i] == pytest.approx(float(p.max()), abs=1e-5), (reuse, i)


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="llama.*opt.*gpt2"):
        family_of("mamba")


def test_the_package_keeps_the_names_its_callers_import():
    """`models` is a package (sources, layers, load): the names the job, engine, benchmark and tests
    import from `adainfer_ray.models` stay there, as the very objects the submodules define."""
    from adainfer_ray import models
    from adainfer_ray.models import layers, load, sources

    homes = {sources: ["DEFAULT_MODEL", "model_id", "resolve_model_dir", "model_fingerprint", "cache_dir",
                       "default_gguf_path", "convert_gguf", "ensure_default_model", "UnsupportedModelError"],
             layers: ["Packed", "attention", "DecoderLM", "family_of", "SUPPORTED_MODEL_TYPES"],
             load: ["load_model", "wrap_model", "pick_device", "DTYPES"]}
    for module, names in homes.items():
        for name in names:
            assert getattr(models, name) is getattr(module, name), (module.__name__, name)


def test_remote_code_folder_is_refused_without_flag(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "x.Model"}}')
    with pytest.raises(UnsupportedModelError, match="trust-remote-code"):
        load_model(str(tmp_path))


def test_unsupported_architecture_folder_fails_before_loading_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(UnsupportedModelError, match="supported: llama"):
        load_model(str(tmp_path))


@pytest.mark.slow
@torch.no_grad()
def test_default_model_layers_reproduce_its_forward(default_lm):
    tok = default_lm.tokenizer
    texts = ["Review: a warm, funny film.\nSentiment:", "Review: I hated every minute.\nSentiment:"]
    items = [tok(t)["input_ids"] for t in texts]
    ids, lens = right_padded(items)
    ours = default_lm.head(default_lm.run_all(ids, lens))
    for b, x in enumerate(items):
        ref = default_lm.model(torch.tensor([x])).logits[0, -1]
        assert torch.allclose(ours[b], ref, atol=1e-4)
    assert default_lm.num_layers == 30 and default_lm.model_hash


NEW_FAMILIES = ["mistral-window", "gemma", "gemma2", "gemma3", "gemma3-vision", "phi3", "granite", "olmo2"]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_engine_results_do_not_depend_on_batching_or_prefix_reuse(family):
    """The engine's own checks (batch sizes 1/8/all, shuffled order; prefix reuse on or off) for the
    families added after those tests were written."""
    from test_engine import test_prefix_reuse_gives_the_same_answers_and_costs_less as prefix_reuse
    from test_engine import test_results_do_not_depend_on_batch_composition as batch_independence

    batch_independence(family)
    prefix_reuse(build_tiny(family))


@pytest.mark.parametrize("family", ["mistral-window", "gemma2", "gemma3", "phi3"])
@torch.no_grad()
def test_sliding_window_is_enforced_not_avoided(family):
    """Items longer than the window: dropping the band mask changes the answer (so the forward
    tests above check it), and the context is not capped to the window."""
    lm = build_tiny(family)
    items = random_items(4, seed=1, lo=20, hi=30)
    ids, lens = right_padded(items)
    banded = lm.head(lm.run_all(ids, lens))
    lm.windows = [None] * lm.num_layers
    assert (lm.head(lm.run_all(ids, lens)) - banded).abs().max() > 1e-2
    assert lm.max_context == lm.config.max_position_embeddings > lm.config.sliding_window


@pytest.mark.parametrize("window,softcap,prefix", [(5, None, 0), (5, None, 7), (None, 0.5, 7), (5, 0.5, 0), (5, 0.5, 7)])
def test_attention_masks_and_caps_like_the_textbook_formula(window, softcap, prefix):
    from adainfer_ray.models import attention

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, d = 3, 4, 2, 11, 8
    q, k, v = (torch.randn(B, h, T, d, generator=g) for h in (H, Hkv, Hkv))
    pkv = tuple(torch.randn(1, Hkv, prefix, d, generator=g) for _ in range(2)) if prefix else None
    out = attention(q, k, v, pkv, 0.3, window, softcap)
    K = torch.cat([pkv[0].expand(B, -1, -1, -1), k], 2) if prefix else k
    V = torch.cat([pkv[1].expand(B, -1, -1, -1), v], 2) if prefix else v
    K, V = K.repeat_interleave(2, 1), V.repeat_interleave(2, 1)
    s = q @ K.transpose(-1, -2) * 0.3
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    for t in range(T):
        for j in range(prefix + T):
            qpos = prefix + t
            if j > qpos or (window and j <= qpos - window):
                s[..., t, j] = float("-inf")
    assert torch.allclose(out, torch.softmax(s, -1) @ V, atol=1e-5)
