"""Progress a person can read wherever the job runs: a driver-side thread that prints, every few
seconds, rows done of the total, rows/s, time left, layers skipped and error rows so far.

Ray Data's own bars need a terminal; under `ray job submit` it logs operator states every 10 s
instead, which these lines replace there. They are plain log lines, printed beside the bars on a
terminal and alone in a job's log. The counts come from the run-state actor (runstate.RunState.add_rows), which every model actor
tells after each batch it labeled; reading them costs one small actor call per line.
"""

from __future__ import annotations

import logging
import threading
import time

from adainfer_ray.report.text import fmt_n, fmt_pct


# Off a terminal (a `ray job submit` log), Ray Data stands in for its bars with a block of operator
# states every 10 s (logging_progress.py), which buries these lines: quieted while they print.
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"


def duration_text(seconds: float) -> str:
    """A time left as a person says it: 42 s, 3 min 05 s, 2 h 10 min."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(counts: dict, total: int | None, elapsed_s: float, exact: bool = True) -> str:
    """One line from the counters (rows, errors, layers_skipped: the sum of each row's skipped share)
    and the rows expected (None when unknown; exact=False: an estimate, and said so)."""
    rows = counts["rows"]
    rate = rows / elapsed_s if elapsed_s > 0 else 0.0
    if total is not None:
        total = max(total, rows)  # an estimate that fell short is not shown as over 100%
        done = f"{fmt_n(rows)} of {'' if exact else 'about '}{fmt_n(total)} rows ({fmt_pct(rows / total if total else 1.0)})"
    else:
        done = f"{fmt_n(rows)} rows"
    line = f"progress: {done}, {rate:.1f} rows/s"
    if total is not None and rate > 0 and rows < total:
        line += f", about {duration_text((total - rows) / rate)} left"
    labeled = rows - counts["errors"]
    skipped = counts["layers_skipped"] / labeled if labeled else None
    return line + f"; layers skipped {fmt_pct(skipped)}, error rows {fmt_n(counts['errors'])}"


class ProgressReporter:
    """Prints `progress_line` every `every_s` seconds while the job labels, and once at the end.

    total: rows this run will label (None when unknown; exact=False: an estimate); the counters already in the run state when
    it starts (the --calibrate sample's) are not this run's labeling and are subtracted."""

    def __init__(self, state, total: int | None, exact: bool, every_s: float, log=print):
        self.state, self.total, self.exact, self.every_s, self.log = state, total, exact, every_s, log
        self._stop = threading.Event()
        self._thread = None

    def _counts(self) -> dict:
        import ray

        now = ray.get(self.state.progress.remote())
        return {k: now[k] - self._base[k] for k in now}

    def _loop(self):
        while not self._stop.wait(self.every_s):
            try:
                self.log(progress_line(self._counts(), self.total, time.perf_counter() - self._started, self.exact))
            except Exception:  # noqa: BLE001 - a progress line is never worth failing the job for
                pass

    def __enter__(self):
        if self.every_s > 0 and self.state is not None:
            import ray

            self._base = ray.get(self.state.progress.remote())
            self._started = time.perf_counter()
            self._thread = threading.Thread(target=self._loop, name="adainfer-progress", daemon=True)
            self._thread.start()
            ray_data_log = logging.getLogger(RAY_DATA_PROGRESS_LOGGER)
            self._ray_data_level = ray_data_log.level
            ray_data_log.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(self._ray_data_level)
        if exc[0] is None:  # the last line: what this run labeled, in all
            self.log(progress_line(self._counts(), self.total, time.perf_counter() - self._started, self.exact))
