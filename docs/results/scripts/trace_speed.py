"""Calibration's trace speed against full-depth labeling, in process through the job's own actor
(Classifier.from_config), on the same SST-2 dev rows: the trace computes only the modes the
default candidates read (calibrate.trace_modes()), so it should cost about what labeling costs.

    PYTHONPATH=$PWD python docs/results/scripts/trace_speed.py ../shared/data/sst2/dev.tsv 160
"""

import sys
import time

import numpy as np
import pyarrow.csv as pcsv

from adainfer_ray.job.actor import Classifier
from adainfer_ray.job.config import JobConfig


def rows_per_s(actor, batch, rounds: int = 2) -> float:
    actor({k: v[:8] for k, v in batch.items()})  # warm-up: first-call allocations
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        actor(batch)
        best = min(best, time.perf_counter() - started)
    return len(batch["text"]) / best


def main(path: str, n: int) -> None:
    table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter="\t"))
    texts = np.array(table.column("sentence").to_pylist()[:n], dtype=object)
    batch = {"text": texts, "id": np.array([str(i) for i in range(len(texts))], dtype=object)}
    full = rows_per_s(Classifier.from_config(JobConfig(policy="full")), batch)
    traced = rows_per_s(Classifier.from_config(JobConfig(policy="full"), trace=True), batch)
    print(f"{len(texts)} rows: full-depth labeling {full:.1f} rows/s, trace {traced:.1f} rows/s "
          f"({traced / full:.0%} of labeling)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 160)
