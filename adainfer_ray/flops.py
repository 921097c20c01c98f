"""Analytic FLOPs per item (2 per multiply-add), from the model config and the item's token count.

Counted: the q/k/v/o projections, the MLP, attention's two quadratic matmuls (QK^T and PV), and
the small heads that read a layer's answer. Not counted (each well under 1% here): norms, RoPE,
softmax, residual adds, embedding lookups.

The reference an item is measured against, `full`, is the whole prompt (prefix + item) through
every layer plus the label head at the last position: the least a full-depth run must compute.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    hidden: int  # D
    layers: int  # L
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    intermediate: int  # MLP width
    mlp_matrices: int  # 3 for gated MLPs (Llama: gate, up, down), 2 otherwise (OPT, GPT-2)
    vocab: int

    @classmethod
    def from_config(cls, cfg) -> "ModelDims":
        t = cfg.model_type
        if t == "gpt2":
            D, H = cfg.n_embd, cfg.n_head
            return cls(D, cfg.n_layer, H, H, D // H, cfg.n_inner or 4 * D, 2, cfg.vocab_size)
        if t == "opt":
            D, H = cfg.hidden_size, cfg.num_attention_heads
            return cls(D, cfg.num_hidden_layers, H, H, D // H, cfg.ffn_dim, 2, cfg.vocab_size)
        D, H = cfg.hidden_size, cfg.num_attention_heads
        return cls(D, cfg.num_hidden_layers, H, getattr(cfg, "num_key_value_heads", None) or H,
                   getattr(cfg, "head_dim", None) or D // H, cfg.intermediate_size, 3, cfg.vocab_size)


def layer_flops(m: ModelDims, new_tokens: int, context: int = 0) -> float:
    """One layer over `new_tokens` tokens that follow `context` tokens already in the KV cache."""
    q_and_o = 2 * m.hidden * m.heads * m.head_dim
    k_and_v = 2 * m.hidden * m.kv_heads * m.head_dim
    mlp = m.mlp_matrices * m.hidden * m.intermediate
    per_token = 2 * (q_and_o + k_and_v + mlp)
    # Token at position p (0-based) attends to p + 1 keys: sum over p = context .. context+new-1.
    keys_seen = new_tokens * context + new_tokens * (new_tokens + 1) // 2
    attn = 2 * 2 * m.heads * m.head_dim * keys_seen
    return float(per_token * new_tokens + attn)


def head_flops(m: ModelDims, outputs: int) -> float:
    """A linear head on the last position's hidden state: D -> outputs."""
    return float(2 * m.hidden * outputs)


def exit_head_outputs(m: ModelDims, mode: str, num_labels: int) -> int:
    """Width of the per-layer exit head: the whole vocabulary, or one row per label."""
    return {"vocab": m.vocab, "label": num_labels, "probe": num_labels, "none": 0}[mode]


def item_flops(m: ModelDims, prefix_len: int, item_len: int, exit_layer: int, mode: str, num_labels: int,
               min_layer: int = 1, reuse_prefix: bool = False) -> dict[str, float]:
    """FLOPs of one item that ran `exit_layer` layers, and the references it is measured against.

    used:        what ran: layers (only the item's own tokens when the prefix is reused), the exit
                 head at each layer where the policy was asked (min_layer .. L-1), and the label
                 head if the item reached the last layer.
    full:        the whole prompt through every layer, no reuse, plus the label head.
    full_reuse:  every layer with the same prefix handling as this run: `full` minus the prefix saving.
    """
    L = m.layers
    answer = head_flops(m, num_labels)
    full = L * layer_flops(m, prefix_len + item_len) + answer
    per_layer = layer_flops(m, item_len, prefix_len) if reuse_prefix else layer_flops(m, prefix_len + item_len)
    full_reuse = L * per_layer + answer
    asked = max(0, min(exit_layer, L - 1) - min_layer + 1) if mode != "none" else 0
    used = exit_layer * per_layer + asked * head_flops(m, exit_head_outputs(m, mode, num_labels))
    if exit_layer == L:
        used += answer
    return {"used": used, "full": full, "full_reuse": full_reuse}
