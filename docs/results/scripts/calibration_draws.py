"""Calibrate on many seeded draws of a kept trace, and measure each policy on rows it never saw.

    python jobs/calibrate.py --input /tmp/sst2-train-maximal.tsv --text-column sentence --label-column label \
        --group-column group --sample 8000 --output /tmp/maximal-policy      # one trace of the 6,885 phrases
    python docs/results/scripts/calibration_draws.py /tmp/maximal-policy --draws 12 --epsilon 0.02

Each draw takes 2,000 rows of the trace (whole groups), calibrates on 1,000 of them with
calibrate.calibrate (no prior: as for a model with no shipped policy) and replays the policy on
the other 1,000 with the same exit simulation calibration uses (exits.py). One `--calibrate 1000`
job costs minutes of model time; a draw here costs seconds, so the spread between draws shows.
"""

import argparse

import numpy as np

from adainfer_ray.calibrate import DEFAULT_FIT_FRACTION, calibrate
from adainfer_ray.exits import rule_outcomes
from adainfer_ray.features import top2
from adainfer_ray.job.trace_file import load_trace


def whole_groups(groups: np.ndarray, candidates: np.ndarray, size: int, rng) -> np.ndarray:
    """Rows of `candidates` from groups taken in random order while they fit in `size` rows."""
    order = rng.permutation(np.unique(groups[candidates]))
    sizes = np.array([np.sum(groups[candidates] == g) for g in order])
    return candidates[np.isin(groups[candidates], order[np.cumsum(sizes) <= size])]


def replay(policy, trace: dict, L: int) -> tuple[float, int]:
    """Share of layers skipped and labels changed when `policy` labels the traced rows."""
    if policy.never_exits:
        return 0.0, 0
    if policy.features == "probe":
        labels, top, gap = top2(policy.probes_.predict_proba(trace["hidden"]))
    else:
        labels, top, gap = (trace[f"{policy.features}_{k}"] for k in ("label", "top", "gap"))
    rows = np.arange(len(labels))
    exits, answers = rule_outcomes(policy, [policy.threshold], rows, labels, top, gap, trace["final_label"])
    return float((L - exits[:, 0]).mean() / L), int((answers[:, 0] != trace["final_label"]).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace_folder")
    ap.add_argument("--draws", type=int, default=12)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--calibrate", type=int, default=1000)
    ap.add_argument("--epsilon", type=float, default=0.02)
    ap.add_argument("--fit-fraction", type=float, default=DEFAULT_FIT_FRACTION)
    args = ap.parse_args()
    saved = load_trace(args.trace_folder)
    groups = saved.groups if saved.groups is not None else np.arange(len(saved.gold))
    L, results = saved.dims.layers, []
    for d in range(args.draws):
        rng = np.random.default_rng(1000 + d)
        rows = whole_groups(groups, np.arange(len(groups)), args.rows, rng)
        cal = whole_groups(groups, rows, args.calibrate, rng)
        rest = np.setdiff1d(rows, cal)
        sub = lambda idx: {k: v[idx] for k, v in saved.trace.items()}  # noqa: E731
        res = calibrate(sub(cal), saved.dims, saved.prefix_tokens, saved.num_labels, epsilon=args.epsilon,
                        gold=saved.gold[cal], groups=groups[cal], seed=d, fit_fraction=args.fit_fraction,
                        log=lambda *_: None)
        skipped, changed = replay(res.policy, sub(rest), L)
        results.append((skipped, changed / len(rest)))
        print(f"draw {d}: {res.policy.features} `{res.summary.get('rule')}`, min_layer {res.summary.get('min_layer')}: "
              f"{skipped:.1%} of layers skipped on the other {len(rest)} rows, {changed} labels changed", flush=True)
    a = np.array(results)
    print(f"mean over {args.draws} draws: {a[:, 0].mean():.1%} of layers skipped (draws {a[:, 0].min():.1%} to "
          f"{a[:, 0].max():.1%}); labels changed {a[:, 1].mean():.2%} on average, at most {a[:, 1].max():.2%} "
          f"(promise {args.epsilon:.0%})")


if __name__ == "__main__":
    main()
