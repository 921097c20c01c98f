"""What every setting runs on (`Workload`): one model, one exit policy, the same token ids.

The policy comes the way the job takes it (`job.plan.checked_policy`: `policy.find_policy`,
then checked against these weights and this prompt), or, with `--policy fit`, from the one
fitting path, `calibrate.calibrate`, on full-depth engine traces of `--fit-data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adainfer_ray.bench.settings import BenchmarkConfig
from adainfer_ray.engine import EarlyExitEngine
from adainfer_ray.flops import ModelDims
from adainfer_ray.policy import ExitPolicy, PolicyError
from adainfer_ray.prompts import PromptEncoder, make_task

def read_labeled(path: str, text_column: str = "sentence", label_column: str = "label",
                 limit: int | None = None, labels: tuple[str, ...] = ()) -> tuple[list[str], np.ndarray]:
    """Texts and gold label indices [n] (-1 where unknown), read by the job's own reader
    (io.read_rows) and mapped to label names as the job maps them (job.actor.gold_names)."""
    from adainfer_ray import io
    from adainfer_ray.job.actor import gold_names

    texts, gold = [], []
    for table in io.read_rows(path, io.detect_format(path), text_column, None, label_column):
        texts += table.column("text").to_pylist()
        gold += table.column("gold_label").to_pylist()
        if limit and len(texts) >= limit:
            break
    texts, gold = texts[:limit] if limit else texts, gold[:limit] if limit else gold
    if not texts or any(t is None for t in texts):
        raise ValueError(f"{path}: no rows, or rows without a {text_column!r} text")
    return texts, np.array([labels.index(g) if g in labels else -1 for g in gold_names(gold, labels, False)])


def fit_policy(lm, encoder: PromptEncoder, texts: list[str], gold: np.ndarray, cfg: BenchmarkConfig,
               log=print) -> ExitPolicy:
    """`--policy fit`: trace `texts` at full depth through the engine and calibrate on the traces,
    as `classify --calibrate` does, with epsilon = 1 - `cfg.fit_agreement`. gold: label indices [n]
    (-1 where unknown). A sample too small for any guarantee yields a full-depth policy, said so."""
    from adainfer_ray.calibrate import calibrate

    enc = encoder.encode(texts)
    engine = EarlyExitEngine(lm, encoder.label_token_ids, None, enc.prefix_ids, reuse_prefix=True)
    trace = engine.trace(enc.item_ids)  # hidden [n, L, D]; {mode}_label/_top/_gap [n, L]; final_label [n]
    trace["item_tokens"] = np.array([len(ids) for ids in enc.item_ids], np.int64)  # [n]
    task = encoder.task
    provenance = {"model_id": lm.model_id, "model_hash": lm.model_hash, "num_layers": lm.num_layers,
                  "task": task.name, "task_fingerprint": task.fingerprint(), "template": task.template,
                  "labels": list(task.labels), "verbalizers": list(task.verbalizers), "dtype": str(lm.dtype),
                  "input": cfg.fit_data, "created_by": "jobs/benchmark.py --policy fit"}
    result = calibrate(trace, ModelDims.from_config(lm.config), len(enc.prefix_ids), len(task.labels),
                       epsilon=1 - cfg.fit_agreement, gold=gold if (gold >= 0).any() else None,
                       provenance=provenance, log=lambda m: log("  " + m))
    return result.policy


def benchmark_policy(spec: str, lm, encoder: PromptEncoder, cfg: BenchmarkConfig, log=print) -> tuple[ExitPolicy, str]:
    """`fit` -> calibrated now on --fit-data and saved under --out; anything else (`default`, a
    policy folder) -> the job's own resolution. A full-depth policy is refused: nothing to measure."""
    if spec == "fit":
        texts, gold = read_labeled(cfg.fit_data, cfg.text_column, cfg.label_column, cfg.fit_limit, encoder.task.labels)
        log(f"calibrating an exit policy on {len(texts)} items of {cfg.fit_data} "
            f"(epsilon {1 - cfg.fit_agreement:.3g}: agreement {cfg.fit_agreement:.0%}) ...")
        policy = fit_policy(lm, encoder, texts, gold, cfg, log)
        folder = Path(cfg.out) / "standin-policy"  # the name earlier results and tests know
        policy.save(folder)
        how = "" if not policy.never_exits else " (no threshold could be guaranteed on so few items: full depth)"
        return policy, f"calibrated on {len(texts)} items of {cfg.fit_data}{how}, saved to {folder}"
    from adainfer_ray.job.plan import checked_policy

    policy = checked_policy(spec, encoder.task, lm.model_id, lm.model_hash, lm.num_layers)
    if policy.never_exits:
        raise PolicyError(f"{spec} is a full-depth policy: the benchmark needs one that exits early")
    return policy, str(spec)


@dataclass
class Workload:
    """What every setting runs on: one model, one policy, the same token ids."""
    lm: object
    items: list[list[int]]
    prefix: list[int]
    label_ids: list[int]
    gold: np.ndarray | None
    policy: ExitPolicy
    policy_source: str
    data: dict
    plan: np.ndarray | None = None  # replayed exit depths (shape runs)


def load_workload(cfg: BenchmarkConfig, device: torch.device, log) -> Workload:
    """The default (or --model) model on real labeled text, with a real exit policy."""
    from adainfer_ray.models import load_model

    lm = load_model(cfg.model, device=str(device))
    task = make_task(cfg.task)
    encoder = PromptEncoder(task, lm.tokenizer, lm.max_context)
    texts, gold = read_labeled(cfg.data, cfg.text_column, cfg.label_column, cfg.limit, task.labels)
    enc = encoder.encode(texts)
    policy, source = benchmark_policy(cfg.policy, lm, encoder, cfg, log)
    return Workload(lm, enc.item_ids, enc.prefix_ids, encoder.label_token_ids, gold, policy, source,
                    {"path": cfg.data, "task": task.name})
