"""The early-exit engine: run a block of prompts layer by layer, each item stopping at its own depth.

Depth regrouping. In-flight items wait in per-depth queues: queue[k] holds items whose next layer
is k. Each step runs the fullest queue (ties: the deepest, to finish items and free memory) on as
many of its items as fit a token budget, shortest first to cut padding (`fit_count`, the one batch
rule, which the benchmark's plain-transformers baselines use too). After the layer, the exit policy
reads each item's features; items that stop leave, the rest move to queue[k+1], and new items are
admitted to queue[0] while fewer than `max_inflight` are in flight. So every layer runs on a batch
of items that all need that layer, and no exited item is ever carried.

Packed steps. A step's items are laid end to end, [N, D] for N real tokens (`models.Packed`): the
projections and the MLP never compute padding; only attention lays q, k, v out as right-padded
rows for the fused kernel. Shortest-first batches keep that padding small too.

An item's result depends only on the item: each item is computed independently (right padding
under a causal mask never lets a real token see a pad), which tests check by running the same items
with batch sizes 1, 8, N and in shuffled order.

Shared prefix. With `reuse_prefix`, the few-shot prefix runs once per engine (per actor); its keys
and values per layer are cached and every item runs only its own tokens, attending to them.

Device traffic per layer step (what keeps small steps cheap, and a GPU busy): the batch's hidden
states are gathered with one indexing op per source step (not one copy per item); index tensors go
host -> device without waiting for the device; the exit decision comes back as one small [4, B]
transfer, the only point where the host waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adainfer_ray.features import FEATURE_MODES, ExitFeatures, probe_input, top2
from adainfer_ray.flops import ModelDims, item_flops
from adainfer_ray.models import Packed
from adainfer_ray.policy import ExitPolicy


def fit_count(lengths: list[int], budget: int, start: int = 0) -> int:
    """How many items from `start` of `lengths` (sorted, shortest first) make one batch: the most
    whose padded size (count x longest) stays within `budget` tokens, at least one."""
    n = 1
    while start + n < len(lengths) and (n + 1) * lengths[start + n] <= budget:
        n += 1
    return n


def length_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches by `fit_count`: the engine's rule, for baselines."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    srt = [lengths[i] for i in order]
    batches, i = [], 0
    while i < len(order):
        n = fit_count(srt, budget, i)
        batches.append(order[i: i + n])
        i += n
    return batches


def default_batch_tokens(device: torch.device) -> int:
    """Tokens per layer step: large enough that a step is matmul-bound on the device."""
    return 16384 if device.type == "cuda" else 2048


def to_device(values, device: torch.device, dtype=torch.long) -> torch.Tensor:
    """A small host list as a device tensor, without making the host wait for the device (on CUDA a
    plain copy from pageable memory synchronises the stream)."""
    t = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass
class _Item:
    index: int  # position in the caller's list
    ids: list[int]  # the item's tokens (with the prefix prepended when it is not reused)
    audit: bool  # keep running to full depth after exiting, to record the full-depth answer
    src: torch.Tensor | None = None  # the step output [N, D] holding its hidden states after the layers run so far
    start: int = 0  # ... as rows start : start + len(ids) of src
    done: bool = False  # its answer is recorded
    # History of its exit answers (policies with history): kept here so it travels with the item
    # when regrouping moves it between steps. streak: consecutive layers with `last_label`;
    # tops: top-1 probability after each layer read so far (only the last few are ever looked at).
    last_label: int = -1
    streak: int = 0
    tops: list | None = None

    def remember(self, label: int, top: float, lag: int) -> tuple[int, float]:
        """Add this layer's answer; return (streak, dtop) as `policy.history_features` defines them."""
        self.streak = self.streak + 1 if label == self.last_label else 1
        self.last_label = label
        self.tops = (self.tops or []) + [top]
        back = self.tops[max(len(self.tops) - 1 - lag, 0)]
        del self.tops[: max(len(self.tops) - lag - 1, 0)]  # keep lag + 1 values
        return self.streak, top - back


def token_rows(starts, lengths) -> np.ndarray:
    """The rows [s, s + n) of every (s, n), concatenated: where packed items' tokens are."""
    lengths = np.asarray(lengths)
    ends = np.cumsum(lengths)
    return np.arange(ends[-1]) + np.repeat(np.asarray(starts) - (ends - lengths), lengths)


class EarlyExitEngine:
    def __init__(self, lm, label_token_ids: list[int], policy: ExitPolicy | None = None,
                 prefix_ids: list[int] | None = None, reuse_prefix: bool = True, regroup: bool = True,
                 max_batch_tokens: int | None = None, max_inflight: int | None = None):
        self.lm = lm
        self.L = lm.num_layers
        self.policy = policy or ExitPolicy.full_depth(self.L)
        if self.policy.never_exits:
            self.policy.num_layers_ = self.L
        self.features = ExitFeatures(lm, label_token_ids, self.policy.features, self.policy.probes_)
        self.num_labels = len(label_token_ids)
        self.prefix_ids = list(prefix_ids or [])
        self.reuse_prefix = reuse_prefix and len(self.prefix_ids) > 0
        self.regroup = regroup
        self.max_batch_tokens = max_batch_tokens or default_batch_tokens(lm.device)
        self.max_inflight = max_inflight
        self.dims = ModelDims.from_config(lm.config)
        self.prefix_kv = self._prefix_cache() if self.reuse_prefix else None
        self.stats = {"steps": 0, "tokens": 0, "padded_tokens": 0}

    # -- the model side ---------------------------------------------------------------------------

    @torch.no_grad()
    def _prefix_cache(self):
        """Keys and values of the shared prefix at every layer: L pairs of [1, Hkv, P, d]."""
        ids = torch.tensor([self.prefix_ids], device=self.lm.device)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        h, cache = self.lm.embed(ids, pos), []
        for i in range(self.L):
            h, kv = self.lm.layer(i, h, pos, return_kv=True)
            cache.append(kv)
        return cache

    @torch.no_grad()
    def _run_layer(self, k: int, items: list[_Item]) -> torch.Tensor:
        """Run layer k on `items` (each at depth k), packed end to end with no padding; point them
        at their new hidden states; return the last-token states [B, D]."""
        lens = [len(it.ids) for it in items]
        B, T = len(items), max(lens)
        starts = np.cumsum([0] + lens[:-1])
        dev = self.lm.device
        offset = len(self.prefix_ids) if self.reuse_prefix else 0
        pos = to_device(offset + token_rows(np.zeros(B, int), lens), dev)[None]  # [1, N]: each token's position
        packed = Packed(to_device(token_rows(np.arange(B) * T, lens), dev), B, T)  # where attention pads them
        if k == 0:
            h = self.lm.embed(to_device([t for it in items for t in it.ids], dev)[None], pos)  # [1, N, D]
        else:
            h = self._gather(items)[None]
        prefix_kv = self.prefix_kv[k] if self.reuse_prefix else None
        h = self.lm.layer(k, h, pos, prefix_kv, packed=packed)[0]  # [N, D]
        for it, s in zip(items, starts):
            it.src, it.start = h, int(s)
        self.stats["steps"] += 1
        self.stats["tokens"] += sum(lens)
        self.stats["padded_tokens"] += B * T  # what attention pads to (the rest of the layer does not)
        return h.index_select(0, to_device(starts + np.asarray(lens) - 1, dev))

    @staticmethod
    def _gather(items: list[_Item]) -> torch.Tensor:
        """The items' hidden states packed as [N, D], in the order of `items` (which `_take` groups
        by source step): one index per source step, none per item, none if a step is taken whole."""
        groups: list[tuple[torch.Tensor, list[_Item]]] = []
        for it in items:
            if not groups or groups[-1][0] is not it.src:
                groups.append((it.src, []))
            groups[-1][1].append(it)
        parts = []
        for step, members in groups:
            rows = token_rows([it.start for it in members], [len(it.ids) for it in members])
            whole = len(rows) == step.shape[0] and members[0].start == 0 and (np.diff(rows) == 1).all()
            parts.append(step if whole else step.index_select(0, to_device(rows, step.device)))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # -- scheduling --------------------------------------------------------------------------------

    def _take(self, queue: list[_Item]) -> list[_Item]:
        """The shortest items of `queue` that fit the token budget (`fit_count`), grouped by the
        step that computed them so that `_gather` indexes each source once."""
        queue.sort(key=lambda it: len(it.ids))
        n = fit_count([len(it.ids) for it in queue], self.max_batch_tokens)
        batch = queue[:n]
        del queue[:n]
        if batch[0].src is not None:
            batch.sort(key=lambda it: (id(it.src), it.start))
        return batch

    @torch.no_grad()
    def classify(self, item_ids: list[list[int]], audit: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Label every item. item_ids: each item's own tokens (the shared prefix is added here).
        audit[i] = True runs item i on to full depth after it exits, to record `full_label`.

        Returns arrays [N]: label, label_score, exit_layer, full_label (-1 unless audited),
        num_tokens, flops_used, flops_full, flops_full_reuse; and label_probs [N, K], every label's
        probability at the exit layer (an audited item keeps its exit layer's)."""
        N = len(item_ids)
        self.out = {"label": np.full(N, -1, np.int32), "label_score": np.zeros(N, np.float32),
                    "exit_layer": np.zeros(N, np.int32), "full_label": np.full(N, -1, np.int32),
                    "label_probs": np.zeros((N, self.num_labels), np.float32)}
        audit = np.zeros(N, bool) if audit is None else np.asarray(audit, bool)
        prefix = [] if self.reuse_prefix else self.prefix_ids
        items = [_Item(i, prefix + list(ids), bool(audit[i])) for i, ids in enumerate(item_ids)]
        if N:
            (self._schedule_regrouped if self.regroup else self._schedule_fixed)(items)
        return self._with_flops(self.out, [len(x) for x in item_ids])

    def _schedule_regrouped(self, items: list[_Item]):
        pending = sorted(items, key=lambda it: len(it.ids), reverse=True)  # pop() gives the shortest
        queues: list[list[_Item]] = [[] for _ in range(self.L)]
        cap = self.max_inflight or len(items)
        inflight = 0
        while pending or inflight:
            while pending and inflight < cap:
                queues[0].append(pending.pop())
                inflight += 1
            k = max(range(self.L), key=lambda j: (len(queues[j]), j))
            batch = self._take(queues[k])
            survivors = self._step(k, batch)
            if k + 1 < self.L:
                queues[k + 1].extend(survivors)
            inflight -= len(batch) - len(survivors)
            for it in batch:
                if it.done and not (it.audit and k + 1 < self.L):
                    it.src = None  # it left: its step's activations are freed with the last such item

    def _schedule_fixed(self, items: list[_Item]):
        """The usual early-exit batching, kept as a baseline: a batch runs until its last item exits,
        exited items riding along (computed, then ignored)."""
        queue = list(items)
        while queue:
            batch = self._take(queue)
            for k in range(self.L):
                if not self._step(k, batch):
                    break
            for it in batch:
                it.src = None

    def _step(self, k: int, batch: list[_Item]) -> list[_Item]:
        """Run layer k, record the answers of items that stop, return the items that go on."""
        h_last = self._run_layer(k, batch)
        layers_run = k + 1
        if layers_run == self.L:  # the model's own answer
            label, score, probs = self.features.answer(h_last)
            label, score, *probs = _host(label, score, *probs.T)  # one transfer; probs: K rows of [B]
            self._record(batch, layers_run, (label, score, np.stack(probs, 1)), final=True)
            return []
        live = [b for b, it in enumerate(batch) if not it.done]
        if live and self.policy.reads_at(layers_run):
            if len(live) < len(batch):  # audited items that already exited run on without features
                h_last = h_last.index_select(0, to_device(live, h_last.device))
            label, top, gap, score, probs = self.features(k, h_last)
            # The step's one device -> host transfer; probs [B, K] travels as K rows of [B].
            label, score, top, gap, *probs = _host(label, score, top, gap, *probs.T)
            probs = np.stack(probs, 1)  # [B, K]
            if self.policy.history:
                self._history = np.array([batch[b].remember(int(lab), float(t), self.policy.dtop_lag)
                                          for b, lab, t in zip(live, label, top)], np.float64).reshape(-1, 2)
            stop = np.flatnonzero(self._exits(layers_run, [batch[b] for b in live], top, gap))
            if len(stop):
                self._record([batch[live[j]] for j in stop], layers_run, (label[stop], score[stop], probs[stop]))
        return [it for it in batch if not it.done or it.audit]

    def _exits(self, layers_run: int, items: list[_Item], top: np.ndarray, gap: np.ndarray) -> np.ndarray:
        """Which of `items` (host features top, gap [B]) stop now: the policy decides. The benchmark
        replays recorded decisions here on random-weight models of real shapes. With history, the
        items' streak and dtop were just updated by `_step` (host arithmetic: no extra transfer)."""
        if self.policy.history:
            return self.policy.exit_mask(layers_run, top, gap, self._history[:, 0], self._history[:, 1])
        return self.policy.exit_mask(layers_run, top, gap)

    def _record(self, items: list[_Item], layers_run: int, answer: tuple[np.ndarray, np.ndarray, np.ndarray],
                final: bool = False):
        label, score, probs = answer  # [B], [B], [B, K]
        for j, it in enumerate(items):
            if not it.done:
                self.out["label"][it.index] = label[j]
                self.out["label_score"][it.index] = score[j]
                self.out["label_probs"][it.index] = probs[j]
                self.out["exit_layer"][it.index] = layers_run
                it.done = True
            if final and it.audit:
                self.out["full_label"][it.index] = label[j]

    def _with_flops(self, out: dict, item_lens: list[int]) -> dict[str, np.ndarray]:
        P = len(self.prefix_ids)
        mode = "none" if self.policy.never_exits else self.policy.features
        flops = [item_flops(self.dims, P, n, int(e), mode, self.num_labels, self.policy.first_read_layer, self.reuse_prefix)
                 for n, e in zip(item_lens, out["exit_layer"])]
        out["num_tokens"] = np.array([P + n for n in item_lens], np.int32)
        for key in ("used", "full", "full_reuse"):
            out["flops_" + key] = np.array([f[key] for f in flops], np.float64)
        return out

    # -- calibration -------------------------------------------------------------------------------

    @torch.no_grad()
    def trace(self, item_ids: list[list[int]], modes=FEATURE_MODES) -> dict[str, np.ndarray]:
        """Run every item to full depth and keep every layer's exit features, for calibration.

        modes: the feature modes the calibration's candidates need (see `calibrate.trace_modes`).
        Returns final_label [n], final_probs [n, K] (every label's probability at full depth) and
        label_label, label_top, label_gap [n, L] always (the label head is a few rows: it gives the
        model's own answer too); with "vocab" also vocab_label, vocab_top, vocab_gap [n, L] (a
        full-vocabulary head at every layer: the costly one, so only when asked); with "probe" hidden
        [n, L, D + K] (features.probe_input: final-normed last-token states and the label head's
        logits on them, computed in the model's dtype and stored as float32: exactly what the
        engine's probes read in production)."""
        unknown = set(modes) - set(FEATURE_MODES)
        if unknown:
            raise ValueError(f"unknown feature modes {sorted(unknown)}: choose from {FEATURE_MODES}")
        n, L = len(item_ids), self.L
        rec = {"final_label": np.zeros(n, np.int32),
               "final_probs": np.zeros((n, len(self.features.label_ids)), np.float32)}
        heads = ("vocab", "label") if "vocab" in modes else ("label",)
        for mode in heads:
            rec.update({f"{mode}_label": np.zeros((n, L), np.int32), f"{mode}_top": np.zeros((n, L), np.float32),
                        f"{mode}_gap": np.zeros((n, L), np.float32)})
        keep_hidden = "probe" in modes
        if keep_hidden:
            rec["hidden"] = None
        prefix = [] if self.reuse_prefix else self.prefix_ids
        queue = [_Item(i, prefix + list(ids), False) for i, ids in enumerate(item_ids)]
        label_ids = self.features.label_ids
        while queue:
            batch = self._take(queue)
            idx = np.array([it.index for it in batch])
            for k in range(L):
                x = self.lm.final_norm(self._run_layer(k, batch))  # [B, D]
                label_logits = self.lm.head_rows(x, label_ids)  # [B, K]
                if keep_hidden:
                    inputs = probe_input(x, label_logits)  # [B, D + K]
                    if rec["hidden"] is None:
                        rec["hidden"] = np.zeros((n, L, inputs.shape[-1]), np.float32)
                    rec["hidden"][idx, k] = inputs.cpu().numpy()
                if "vocab" in heads:
                    logits = self.lm.head(x).float()
                    _, top, gap = top2(torch.softmax(logits, -1))
                    lab, _, _ = top2(torch.softmax(logits[:, label_ids], -1))
                    rec["vocab_label"][idx, k], rec["vocab_top"][idx, k], rec["vocab_gap"][idx, k] = _host(lab, top, gap)
                probs = torch.softmax(label_logits.float(), -1)  # [B, K]
                lab, top, gap = top2(probs)
                rec["label_label"][idx, k], rec["label_top"][idx, k], rec["label_gap"][idx, k] = _host(lab, top, gap)
            rec["final_probs"][idx] = probs.cpu().numpy()
            rec["final_label"][idx] = rec["label_label"][idx, L - 1]
            for it in batch:
                it.src = None
        return rec


def _host(*values: torch.Tensor) -> list[np.ndarray]:
    """Several [B] device tensors as host arrays in one transfer (labels come back as exact
    small integers through float32)."""
    stacked = torch.stack([v.float() for v in values]).cpu().numpy()  # [len(values), B]
    return [row.astype(np.int64) if not v.is_floating_point() else row for row, v in zip(stacked, values)]
