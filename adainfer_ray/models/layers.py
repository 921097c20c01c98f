"""Decoder LMs, run one layer at a time over plain tensors.

A `DecoderLM` holds the Hugging Face model (only as a holder of weights), its tokenizer, and four
small functions the engine calls:

    h = lm.embed(ids, pos)                     # [B, T] -> [B, T, D]
    h = lm.layer(i, h, pos, prefix_kv, packed) # [B, T, D] -> [B, T, D]; one decoder layer
                                               # (packed: [1, N, D] of items end to end)
    x = lm.final_norm(h)                       # [..., D]
    z = lm.head(x)                             # [..., D] -> [..., V]

Each family writes its layer as a few lines of tensor code over the model's own modules
(projections, norms, MLP, rotary embedding), so that an item can stop after any layer and a shared
few-shot prefix can be attended to from a cache. Running every layer reproduces the model's own
`forward` (tests check fp32 logits to 1e-4 for every family). Where the weights come from is not
this module's business (`sources.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adainfer_ray.models.errors import UnsupportedModelError

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "granite")
GEMMA_STYLE = ("gemma2", "gemma3_text", "gemma3")
SUPPORTED_MODEL_TYPES = LLAMA_STYLE + GEMMA_STYLE + ("olmo2", "opt", "gpt2")


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


def context_limit(text_config) -> int:
    """Tokens a prompt may hold: the model's positions (sliding windows are enforced in attention(),
    so they set no cap here)."""
    return (getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
            or 2048)


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

