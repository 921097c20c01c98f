"""FLOPs accounting against a count done by hand on a tiny config."""

from types import SimpleNamespace

import pytest

from adainfer_ray.flops import ModelDims, item_flops, layer_flops

# D=8, 2 layers, 2 query heads of 4, 1 KV head, MLP width 16 (gated), vocab 50.
CFG = SimpleNamespace(model_type="llama", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=4, intermediate_size=16, vocab_size=50)


def test_layer_flops_by_hand():
    m = ModelDims.from_config(CFG)
    # per token: q 8x8, k 8x4, v 8x4, o 8x8 = 64+32+32+64 = 192 MACs; MLP 3 x 8x16 = 384 MACs
    # -> 2 * 576 = 1152 FLOPs per token; 3 tokens -> 3456.
    # attention: keys seen 1+2+3 = 6; QK and PV: 2 matmuls x 2 FLOPs x heads(2) x head_dim(4) x 6 = 192
    assert layer_flops(m, 3) == 3456 + 192
    # 2 new tokens after 5 cached: keys seen 6 + 7 = 13 -> 2*2*2*4*13 = 416
    assert layer_flops(m, 2, context=5) == 2 * 1152 + 416


def test_item_flops_exit_and_reuse_by_hand():
    m = ModelDims.from_config(CFG)
    full_layer = layer_flops(m, 5)  # prefix 2 + item 3
    f = item_flops(m, prefix_len=2, item_len=3, exit_layer=1, mode="vocab", num_labels=2)
    assert f["full"] == 2 * full_layer + 2 * 8 * 2  # every layer + the 2-label head
    assert f["full_reuse"] == f["full"]  # no reuse: the same
    assert f["used"] == full_layer + 2 * 8 * 50  # one layer + the vocab exit head once
    g = item_flops(m, prefix_len=2, item_len=3, exit_layer=2, mode="probe", num_labels=2, reuse_prefix=True)
    reused = layer_flops(m, 3, context=2)
    assert g["full_reuse"] == 2 * reused + 32
    assert g["used"] == 2 * reused + 32 + 32  # probe head asked after layer 1, label head after layer 2
    assert g["used"] < g["full"]


def test_dims_of_each_family():
    opt = SimpleNamespace(model_type="opt", hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                          ffn_dim=64, vocab_size=10)
    d = ModelDims.from_config(opt)
    assert (d.kv_heads, d.head_dim, d.mlp_matrices) == (2, 8, 2)
    gpt2 = SimpleNamespace(model_type="gpt2", n_embd=16, n_layer=3, n_head=4, n_inner=None, vocab_size=10)
    assert ModelDims.from_config(gpt2).intermediate == 64
    with pytest.raises(KeyError):
        item_flops(d, 1, 1, 1, "nonsense", 2)
