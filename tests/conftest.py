"""Shared fixtures: tiny random decoder LMs of every supported family, built from a config (no downloads)."""

import numpy as np
import pytest
import torch

TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=256),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                    sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=256),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=6, head_dim=16,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=256),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=6, num_attention_heads=4,
                vocab_size=128, max_position_embeddings=256, word_embed_proj_dim=64),
    "opt-postnorm": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=6, num_attention_heads=4,
                         vocab_size=128, max_position_embeddings=256, word_embed_proj_dim=32,
                         do_layer_norm_before=False),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=6, n_head=4, vocab_size=128, n_positions=256,
                 bos_token_id=0, eos_token_id=0),
}


def build_tiny(family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    from adainfer_ray.models import wrap_model

    cfg = dict(TINY_CONFIGS[family])
    torch.manual_seed(seed)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    return wrap_model(model, tokenizer=None, model_id=f"tiny-{family}", model_hash=family)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_lm(request):
    return build_tiny(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return build_tiny("llama")


def random_items(n: int, seed: int = 0, vocab: int = 128, lo: int = 3, hi: int = 20) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, rng.integers(lo, hi)).tolist() for _ in range(n)]


@pytest.fixture(scope="session")
def default_lm():
    """The real embedded default model (SmolLM2-135M-Instruct), converted once into the user cache."""
    from adainfer_ray.models import load_model

    torch.set_num_threads(2)
    return load_model(device="cpu")
