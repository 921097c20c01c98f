"""Layer-by-layer execution reproduces each family's own forward, with and without a prefix cache."""

import pytest
import torch

from adainfer_ray.models import UnsupportedModelError, family_of, load_model
from conftest import random_items


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


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="llama.*opt.*gpt2"):
        family_of("mamba")


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
