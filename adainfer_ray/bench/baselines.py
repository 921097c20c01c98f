"""The runners of every setting: the plain-transformers baselines (`HFForward`) and the engine
as the benchmark drives it (`RecordingEngine`, `ReplayEngine`); `make_runners` builds them."""

from __future__ import annotations

import numpy as np
import torch

from adainfer_ray.bench.workload import Workload
from adainfer_ray.engine import EarlyExitEngine, length_batches

class HFForward:
    """The model's own forward over the same token ids the engine sees, full depth, no early exit.

    Batches follow the engine's rule (`length_batches`). The answer is the argmax over the label
    tokens' logits at the last position.

    prefix_cached=False  (a, a'): prefix + item, left-padded with an attention mask and explicit
        position ids, `use_cache=False`. `logits_to_keep=0` runs the LM head on every position (what
        `model(**batch).logits[:, -1]` computes); `logits_to_keep=1` on the last one only.
    prefix_cached=True   (r): what a careful transformers user writes for a shared few-shot prefix:
        the prefix runs once (`past_key_values`, a DynamicCache); each batch gets that cache expanded
        to its size (`DynamicCache(ddp_cache_data=...)` copies it, as the forward appends to it) and
        runs only the items' own tokens, left-padded after the prefix (mask: prefix, pads, item),
        `logits_to_keep=1`."""

    def __init__(self, lm, label_token_ids: list[int], prefix_ids: list[int], batch_tokens: int,
                 logits_to_keep: int = 1, prefix_cached: bool = False):
        self.lm, self.prefix_ids, self.batch_tokens = lm, list(prefix_ids), batch_tokens
        self.label_ids = torch.tensor(label_token_ids, device=lm.device)
        self.logits_to_keep = logits_to_keep
        pad = getattr(lm.tokenizer, "pad_token_id", None) if lm.tokenizer is not None else None
        self.pad_id = pad if pad is not None else 0
        self.prefix_cached = prefix_cached and bool(self.prefix_ids)
        self.prefix_kv = self._prefix_cache() if self.prefix_cached else None
        self.batch_sizes: list[int] = []

    @torch.no_grad()
    def _prefix_cache(self):
        out = self.lm.model(input_ids=torch.tensor([self.prefix_ids], device=self.lm.device), use_cache=True)
        return [(layer.keys, layer.values) for layer in out.cache.layers]  # L x [1, Hkv, P, d]

    def _batch(self, seqs: list[list[int]], before: int):
        """Left-padded ids [B, T], attention mask [B, before + T] (the first `before` columns: the
        cached prefix) and position ids [B, T]."""
        B, T = len(seqs), max(map(len, seqs))
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, before + T, dtype=torch.long)
        mask[:, :before] = 1
        for r, s in enumerate(seqs):
            ids[r, T - len(s):] = torch.tensor(s)
            mask[r, before + T - len(s):] = 1
        pos = (mask.cumsum(-1) - 1)[:, before:].clamp(min=before)
        dev = self.lm.device
        return ids.to(dev), mask.to(dev), pos.to(dev)

    @torch.no_grad()
    def classify(self, item_ids: list[list[int]]) -> dict[str, np.ndarray]:
        from transformers import DynamicCache

        seqs = [list(x) if self.prefix_cached else self.prefix_ids + list(x) for x in item_ids]
        before = len(self.prefix_ids) if self.prefix_cached else 0
        N = len(seqs)
        label, score = np.zeros(N, np.int32), np.zeros(N, np.float32)
        self.batch_sizes = []
        for batch in length_batches([len(s) for s in seqs], self.batch_tokens):
            ids, mask, pos = self._batch([seqs[j] for j in batch], before)
            kw = {"use_cache": False}
            if self.prefix_cached:
                B = len(batch)
                cache = DynamicCache(ddp_cache_data=[(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
                                                     for k, v in self.prefix_kv], config=self.lm.config)
                kw = {"use_cache": True, "cache": cache}  # transformers 5: `cache` (was past_key_values)
            out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                logits_to_keep=self.logits_to_keep, **kw)
            probs = torch.softmax(out.logits[:, -1, self.label_ids].float(), -1)
            top = probs.max(-1)
            label[batch], score[batch] = top.indices.cpu().numpy(), top.values.cpu().numpy()
            self.batch_sizes.append(len(batch))
        return {"label": label, "label_score": score, "exit_layer": np.full(N, self.lm.num_layers, np.int32)}


class RecordingEngine(EarlyExitEngine):
    """The engine, recording the batches the fixed-batch scheduler takes (to count the FLOPs of
    exited items carried along). Recording is a list append per batch: no effect on timing."""

    def _take(self, queue):
        batch = super()._take(queue)
        if not self.regroup:
            self.batches.append([it.index for it in batch])
        return batch

    def classify(self, item_ids, audit=None):
        self.batches = []
        return super().classify(item_ids, audit)


class ReplayEngine(RecordingEngine):
    """The engine with a real policy's exit depths replayed by item (`plan[i]` = layers item i runs),
    for models of real shapes with random weights, whose own features mean nothing. Everything else,
    the features included, runs as in production; only the stop decision is looked up."""

    plan: np.ndarray

    def _exits(self, layers_run, items, top, gap):
        return np.array([self.plan[it.index] == layers_run for it in items], bool)


def make_runners(w: Workload, settings: list[str], budget: int, hf_budget: int, max_inflight: int | None) -> dict:
    def engine(exit_early: bool, reuse: bool, regroup: bool = True):
        cls = ReplayEngine if w.plan is not None else RecordingEngine
        eng = cls(w.lm, w.label_ids, w.policy if exit_early else None, prefix_ids=w.prefix, reuse_prefix=reuse,
                  regroup=regroup, max_batch_tokens=budget, max_inflight=max_inflight)
        eng.plan = w.plan
        return eng

    make = {
        "hf_prefix_cached": lambda: HFForward(w.lm, w.label_ids, w.prefix, hf_budget, 1, prefix_cached=True),
        "hf_forward": lambda: HFForward(w.lm, w.label_ids, w.prefix, hf_budget, logits_to_keep=0),
        "hf_forward_last": lambda: HFForward(w.lm, w.label_ids, w.prefix, hf_budget, logits_to_keep=1),
        "engine_full": lambda: engine(False, False),
        "engine_full_prefix": lambda: engine(False, True),
        "exit_fixed_batches": lambda: engine(True, False, regroup=False),
        "exit_regrouped": lambda: engine(True, False),
        "exit_regrouped_prefix": lambda: engine(True, True),
    }
    return {s: make[s]() for s in settings}
