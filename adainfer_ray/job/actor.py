"""The model actor (Classifier): loads the model once, then maps one batch of input rows to the
same rows as output rows (labels, the audit's full-depth labels, and in trace mode every layer's
exit features); and the helpers that type those rows as schema.OUTPUT_SCHEMA."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pyarrow as pa

from adainfer_ray import runstate
from adainfer_ray.job.config import JobConfig
from adainfer_ray.job.sampling import audit_mask
from adainfer_ray.schema import OUTPUT_SCHEMA

# The per-layer exit features a trace can hold ([L] per row; hidden: [L, D + K], features.probe_input), as the engine's trace names them.
TRACE_FEATURES = ("hidden", "vocab_label", "vocab_top", "vocab_gap", "label_label", "label_top", "label_gap")


def trace_features(modes: tuple[str, ...]) -> tuple[str, ...]:
    """The trace columns the engine returns for these feature modes (calibrate.trace_modes): the
    label head always (it is the model's own answer), hidden with "probe", vocab_* with "vocab"."""
    wanted = {"label_label", "label_top", "label_gap"}
    wanted |= {"hidden"} if "probe" in modes else set()
    wanted |= {"vocab_label", "vocab_top", "vocab_gap"} if "vocab" in modes else set()
    return tuple(k for k in TRACE_FEATURES if k in wanted)


class Classifier:
    """Ray Data callable class: loads the model once, then maps a batch of rows to output rows.

    `task` and `policy` come resolved from the driver (job.plan). trace=True runs every row at full
    depth and adds each layer's exit features (calibration); the output rows are the same either way.
    """

    def __init__(self, cfg: JobConfig, task, policy, threads: int | None = None, trace: bool = False,
                 audit_rate: float = 0.0, gold_one_based: bool = False, text_column: str = "text",
                 id_column: str | None = "id", keep_columns: tuple = (), run_state=None):
        # run_state: the run's RunState (runstate.py): poison rows, the online audit and its decision
        runstate.mark(run_state, "actor_start")  # the run's timeline (_run.json): where start-up time goes
        import torch

        from adainfer_ray.engine import EarlyExitEngine
        from adainfer_ray.models import load_model
        from adainfer_ray.policy import ExitPolicy
        from adainfer_ray.prompts import PromptEncoder

        if threads:  # CPU actors share the node's cores (job.cluster.threads_per_actor)
            torch.set_num_threads(threads)
        from adainfer_ray.calibrate import trace_modes

        self.cfg, self.task, self.trace = cfg, task, trace
        # trace mode computes only what the calibration's candidate rules read: the full-vocabulary
        # head at every layer is the costly part, and the default candidates do not use it
        self.trace_modes = trace_modes()
        self.trace_features = trace_features(self.trace_modes)
        self.audit_rate, self.gold_one_based = audit_rate, gold_one_based
        self.text_column, self.id_column, self.keep_columns = text_column, id_column, tuple(keep_columns)
        self.lm = load_model(cfg.model, cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        self.encoder = PromptEncoder(task, self.lm.tokenizer, self.lm.max_context)
        policy = ExitPolicy.full_depth() if trace else policy
        # The driver checked the policy against its copy of the weights; this worker may hold another.
        policy.check_compatible(self.lm.model_hash, task.fingerprint(), self.lm.num_layers)
        self.engine = EarlyExitEngine(self.lm, self.encoder.label_token_ids, policy, self.encoder.prefix_ids,
                                      reuse_prefix=cfg.reuse_prefix, max_batch_tokens=cfg.max_batch_tokens)
        self.full_engine = None  # built once the audit shows the promise broken, under --on-drift full
        self.run_state = run_state  # where this actor ran, and poison rows that end (runstate.py)
        runstate.register_actor(run_state)
        runstate.mark(run_state, "actor_ready")
        self.calls = 0

    @classmethod
    def from_config(cls, cfg: JobConfig, **kwargs) -> "Classifier":
        """An actor's worth of labeling in this process (tests, notebooks): task and policy resolved
        as the job's driver resolves them (job.plan.plan_labeling)."""
        from adainfer_ray.job.plan import plan_labeling

        labeling = plan_labeling(cfg)
        return cls(cfg, labeling.task, labeling.policy, **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self.calls += 1
        crash_after = os.environ.get("ADAINFER_CRASH_AFTER_BATCHES")  # reliability tests kill actors this way
        if crash_after and self.calls > int(crash_after):
            os._exit(1)
        n = len(batch[self.text_column])
        ids = self._ids(batch)
        texts, errors = self._checked_texts(batch)
        rows = empty_rows(n, self.lm.num_layers)
        traces = [None] * n  # trace mode: each row's per-layer features

        def run(at: list[int]):  # label (or trace) the rows `at` of this batch
            runstate.crash_drill([texts[i] for i in at])
            encoded = self.encoder.encode([texts[i] for i in at])
            if self.trace:
                self._trace(encoded, at, rows, traces)
            else:
                self._label(encoded, at, [ids[i] for i in at], rows, errors)

        ok = [i for i in range(n) if errors[i] is None]
        key, attempt, kills, drifted = runstate.begin_block(self.run_state, ids)
        self._act_on_drift(drifted)
        if ok:  # a retried block runs row by row, so that a row that kills the actor ends as an error row
            runstate.label_block(self.run_state, key, attempt, kills, ok, errors, run)
        if not self.trace and not drifted:
            runstate.add_audit(self.run_state, key, n, audit_counts(rows, batch.get("gold_label"), self.task.labels,
                                                                  self.gold_one_based, errors))
        rows["id"] = np.array(ids, dtype=object)
        gold = batch.get("gold_label", [None] * n)
        rows["gold_label"] = np.array(gold_names(gold, self.task.labels, self.gold_one_based), dtype=object)
        rows["calibration"] = np.full(n, self.trace)
        rows["after_drift"] = np.full(n, drifted)
        rows["error"] = np.array(errors, dtype=object)
        table = self._with_extra_columns(to_output_table(rows), batch, traces)
        labeled = np.array([e is None for e in errors])
        skipped = (self.lm.num_layers - rows["exit_layer"][labeled].astype(np.float64)) / self.lm.num_layers
        runstate.add_rows(self.run_state, n, int((~labeled).sum()), float(skipped.sum()))  # progress lines
        if self.calls == 1:  # the run keeps the earliest of its actors' first batches: first_labels_s
            runstate.mark(self.run_state, "first_labels")
        runstate.mark(self.run_state, "last_labels", last=True)  # labeling time: actor_ready to last_labels
        return table

    def _act_on_drift(self, drifted: bool) -> None:
        """Once the online audit has shown the promise broken: --on-drift stop ends the run (the driver
        says so in one line); full labels at full depth from this block on; warn labels on as before."""
        if not drifted or self.trace:
            return
        if self.cfg.on_drift == "stop":
            raise DriftStop("the online audit showed the promise broken: stopping (--on-drift stop)")
        if self.cfg.on_drift == "full" and self.full_engine is None:
            from adainfer_ray.engine import EarlyExitEngine
            from adainfer_ray.policy import ExitPolicy

            self.full_engine = EarlyExitEngine(self.lm, self.encoder.label_token_ids, ExitPolicy.full_depth(),
                                               self.encoder.prefix_ids, reuse_prefix=self.cfg.reuse_prefix,
                                               max_batch_tokens=self.cfg.max_batch_tokens)
            self.engine = self.full_engine

    def _ids(self, batch) -> list[str]:
        """The rows' ids; label() without an id column draws its audit sample by text."""
        if self.id_column in batch:
            return [str(x) for x in batch[self.id_column]]
        return [hashlib.blake2b(str(t).encode(), digest_size=8).hexdigest() for t in batch[self.text_column]]

    def _checked_texts(self, batch) -> tuple[list, list]:
        """[n] texts (None where not a string) and [n] errors (None where the row can be labeled)."""
        raw = batch[self.text_column]
        errors = [e if isinstance(e, str) else None for e in batch.get("input_error", [None] * len(raw))]
        texts = [t if isinstance(t, str) else None for t in raw]
        for i, t in enumerate(texts):
            if errors[i] is None and t is None:
                errors[i] = "text is null" if raw[i] is None else "text is not a string"
            elif errors[i] is None and not t.strip():
                errors[i] = "text is empty"
        return texts, errors

    def _with_extra_columns(self, table: pa.Table, batch, traces) -> pa.Table:
        for name in self.keep_columns:  # label(): the caller's own columns ride along
            table = table.append_column(name, pa.array(list(batch[name])))
        if self.trace:
            for key in self.trace_features + ("item_tokens",):  # one list per row, null where a row has no trace
                table = table.append_column("trace_" + key, _list_column([tr and tr[key] for tr in traces]))
        return table

    def _label(self, encoded, where, ids, rows, errors):
        """Run the engine on the good rows; if the block fails as a whole, retry item by item so
        that one poisonous row becomes one error row."""
        audit = audit_mask(ids, self.audit_rate, self.cfg.seed)
        try:
            started = time.perf_counter()
            out = self.engine.classify(encoded.item_ids, audit)
            runstate.add_engine_time(self.run_state, time.perf_counter() - started)
            parts = [(np.arange(len(where)), out)]
        except Exception:  # noqa: BLE001 - isolate the culprit below
            parts = []
            for j in range(len(where)):
                try:
                    parts.append((np.array([j]), self.engine.classify([encoded.item_ids[j]], audit[j: j + 1])))
                except Exception as e:  # noqa: BLE001
                    errors[where[j]] = f"labeling failed: {type(e).__name__}: {e}"[:500]
        for js, out in parts:
            self._fill(rows, np.array(where)[js], out, np.array(encoded.truncated)[js])

    def _trace(self, encoded, where, rows, traces):
        """Full depth with every layer's exit features: fill the output rows (the full model's answer,
        at full depth) and keep each row's trace. The exit heads' own FLOPs are not counted here."""
        from adainfer_ray.flops import item_flops

        tr = self.engine.trace(encoded.item_ids, modes=self.trace_modes)
        L, P = self.lm.num_layers, len(self.encoder.prefix_ids)
        flops = [item_flops(self.engine.dims, P, len(x), L, "none", len(self.task.labels), 1, self.cfg.reuse_prefix)
                 for x in encoded.item_ids]
        out = {"label": tr["final_label"], "label_score": tr["label_top"][:, -1], "label_probs": tr["final_probs"],
               "exit_layer": np.full(len(where), L),
               "full_label": tr["final_label"], "num_tokens": np.array([P + len(x) for x in encoded.item_ids]),
               **{"flops_" + k: np.array([f[k] for f in flops]) for k in ("used", "full", "full_reuse")}}
        self._fill(rows, np.array(where), out, np.array(encoded.truncated))
        for j, i in enumerate(where):
            traces[i] = {**{key: tr[key][j] for key in self.trace_features},
                         "item_tokens": np.array([len(encoded.item_ids[j])])}

    def _fill(self, rows, at, out, truncated):
        labels = np.array(self.task.labels, dtype=object)
        rows["label"][at] = labels[out["label"]]
        rows["label_score"][at] = out["label_score"]
        for j, i in enumerate(at):  # [K] per row, in the order of task.labels (_run.json `labels`)
            rows["label_probs"][i] = out["label_probs"][j]
        rows["exit_layer"][at] = out["exit_layer"]
        rows["flops_used"][at], rows["flops_full"][at] = out["flops_used"], out["flops_full"]
        full, reuse = out["flops_full"], out["flops_full_reuse"]
        rows["compute_saved"][at] = 1 - out["flops_used"] / full
        rows["exit_saved"][at] = (reuse - out["flops_used"]) / full
        rows["prefix_saved"][at] = (full - reuse) / full
        rows["num_tokens"][at] = out["num_tokens"]
        rows["truncated"][at] = truncated
        audited = out["full_label"] >= 0
        rows["full_label"][at[audited]] = labels[out["full_label"][audited]]


class DriftStop(RuntimeError):
    """Raised in a model actor under --on-drift stop once the audit shows the promise broken."""


def audit_counts(rows, gold, labels, one_based: bool, errors) -> dict:
    """One block's audit counts for online_audit.OnlineAudit.add: audited rows (full depth known),
    how many early exit changed, and on rows with a gold label which depth alone was wrong."""
    audited = np.array([f is not None and e is None for f, e in zip(rows["full_label"], errors)], bool)
    label, full = rows["label"][audited], rows["full_label"][audited]
    counts = {"audited": int(audited.sum()), "changed": int(sum(a != b for a, b in zip(label, full)))}
    if gold is not None:
        names = np.array(gold_names(list(gold), labels, one_based), dtype=object)[audited]
        has = np.array([g in labels for g in names], bool)
        exit_ok = np.array([a == g for a, g in zip(label, names)], bool)
        full_ok = np.array([b == g for b, g in zip(full, names)], bool)
        counts.update(with_gold=int(has.sum()), exit_only_wrong=int((has & ~exit_ok & full_ok).sum()),
                      full_only_wrong=int((has & exit_ok & ~full_ok).sum()))
    return counts


# -- the output rows -----------------------------------------------------------------------------------


def gold_names(values, labels: tuple[str, ...], one_based: bool) -> list:
    """Gold labels as label names: names match case-insensitively; integers are indices (0-based,
    or 1-based as decided once for the whole input). Anything else is kept as given."""
    by_name = {x.lower(): x for x in labels}
    out = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        s = str(v).strip()
        if s.lower() in by_name:
            out.append(by_name[s.lower()])
        elif s.lstrip("-").isdigit() and 0 <= int(s) - one_based < len(labels):
            out.append(labels[int(s) - one_based])
        else:
            out.append(s)
    return out


def empty_rows(n: int, num_layers: int) -> dict[str, np.ndarray]:
    """[n] per output column, as a row that failed has them (the engine fills the rest)."""
    nan = np.full(n, np.nan)
    return {"label": np.full(n, None, dtype=object), "label_score": np.full(n, np.nan, np.float32),
            "label_probs": np.full(n, None, dtype=object),
            "exit_layer": np.full(n, None, dtype=object), "num_layers": np.full(n, num_layers, np.int32),
            "flops_used": nan.copy(), "flops_full": nan.copy(), "compute_saved": nan.copy(),
            "exit_saved": nan.copy(), "prefix_saved": nan.copy(), "num_tokens": np.full(n, None, dtype=object),
            "truncated": np.zeros(n, bool), "full_label": np.full(n, None, dtype=object),
            "after_drift": np.zeros(n, bool)}


def to_output_table(rows: dict[str, np.ndarray]) -> pa.Table:
    """Typed exactly as OUTPUT_SCHEMA, nulls where a row failed."""
    cols = []
    for f in OUTPUT_SCHEMA:
        v = rows[f.name]
        if pa.types.is_floating(f.type):
            cols.append(pa.array(v, f.type, mask=np.isnan(np.asarray(v, np.float64))))
        else:
            cols.append(pa.array(list(v), f.type))
    return pa.table(cols, schema=OUTPUT_SCHEMA)


def _list_column(values: list) -> pa.Array:
    """One float32 list per row from numpy arrays (flattened), null where a value is None."""
    sizes = [0 if v is None else v.size for v in values]
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    present = [v.ravel().astype(np.float32) for v in values if v is not None]
    flat = pa.array(np.concatenate(present) if present else np.zeros(0, np.float32))
    return pa.ListArray.from_arrays(offsets, flat, mask=pa.array([v is None for v in values]))
