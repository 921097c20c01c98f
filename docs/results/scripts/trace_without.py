"""A calibration trace without the rows of another file: to make a prior that never saw them.

    python docs/results/scripts/trace_without.py adainfer_ray/data/policies/smollm2-135m-sentiment \
        /tmp/sst2-train-maximal.tsv /tmp/sst2-2000.tsv /tmp/trace-without-2000
    python jobs/calibrate.py --refit /tmp/trace-without-2000 --prior none --output /tmp/prior-without-2000

The trace of the shipped sentiment policy covers all 6,885 SST-2 train maximal phrases; its group
codes are the positions of each row's lower-cased text among the sorted distinct ones of the
calibration input (job.trace_file), so the rows of a second file can be found and dropped. The
refit then calibrates a policy on the other rows only: a fair prior for `--calibrate` on that file.
"""

import csv
import sys

import numpy as np

from adainfer_ray.job.trace_file import SavedTrace, load_trace, save_trace


def texts(path: str) -> list[str]:
    with open(path, newline="") as f:
        return [r["sentence"].strip().lower() for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def main(trace_folder: str, calibration_input: str, drop_input: str, out: str) -> None:
    saved = load_trace(trace_folder)
    distinct = sorted(set(texts(calibration_input)))  # what the group codes index
    drop = {distinct.index(t) for t in set(texts(drop_input)) if t in set(distinct)}
    keep = ~np.isin(saved.groups, list(drop))
    kept = SavedTrace({k: v[keep] for k, v in saved.trace.items()}, saved.gold[keep], saved.groups[keep],
                      saved.dims, saved.prefix_tokens, saved.num_labels,
                      {**saved.provenance, "input": f"{calibration_input} without {drop_input}"})
    save_trace(out, kept)
    print(f"kept {int(keep.sum())} of {len(keep)} traced rows (dropped the {len(keep) - int(keep.sum())} "
          f"in {drop_input}) -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
