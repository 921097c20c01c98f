"""What one run's model actors tell each other through a named Ray actor: where they ran, and which
block (and which row of it) was being labeled when an actor died.

Ray Data restarts a dead model actor and runs the blocks it held again, without limit. A row that
kills the actor itself (a segfault in a kernel, an out-of-memory kill, os._exit) would do so on every
attempt, forever. So each block is counted:

    attempt 1    the block is labeled as usual, in one engine call;
    attempt >= 2 an actor died holding it: its rows run one at a time, each announced first (started);
                 a row announced in an attempt that then died has killed an actor once more, and after
                 ROW_KILL_LIMIT such deaths it is not run again but written as an error row, while the
                 rest of its block is still labeled. The job finishes.

The counts live in this actor, not in the model actors, because these are what die. A block is known
by a digest of its ids, which Ray's retry hands over unchanged.
"""

from __future__ import annotations

import hashlib
import os
import time

ROW_KILL_LIMIT = 2  # deaths of a model actor while one row ran, before that row is given up


class RunState:
    """The named actor (one per run, zero CPUs): attempts per block, the row in flight, node ids,
    and when the model actors reached each step of the run (its timeline: start-up, first and last labels)."""

    def __init__(self):
        self.attempts: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}  # block -> the row being labeled one at a time
        self.kills: dict[str, dict[int, int]] = {}  # block -> row -> actor deaths while it ran
        self.nodes: dict[str, int] = {}  # node id -> model actors started there
        self.engine_s = 0.0  # seconds the model actors spent inside the engine, summed
        self.times: dict[str, float] = {}  # event -> wall-clock time (time.time()): the first actor's, or the last's
        self.counts = {"rows": 0, "errors": 0, "layers_skipped": 0.0}  # rows labeled so far (job.progress)

    def add_actor(self, node_id: str) -> None:
        self.nodes[node_id] = self.nodes.get(node_id, 0) + 1

    def actor_nodes(self) -> dict[str, int]:
        return dict(self.nodes)

    def add_engine_seconds(self, seconds: float) -> None:
        self.engine_s += seconds

    def engine_seconds(self) -> float:
        return self.engine_s

    def add_rows(self, rows: int, errors: int, layers_skipped: float) -> None:
        """A batch was labeled: its rows, error rows, and the sum of its rows' skipped layer shares."""
        for key, value in (("rows", rows), ("errors", errors), ("layers_skipped", layers_skipped)):
            self.counts[key] += value

    def progress(self) -> dict:
        return dict(self.counts)

    def mark(self, event: str, at: float, last: bool = False) -> None:
        self.times[event] = (max if last else min)(at, self.times.get(event, at))

    def marks(self) -> dict[str, float]:
        return dict(self.times)

    def begin(self, block: str) -> tuple[int, dict[int, int]]:
        """A model actor starts `block`: returns (attempt number, actor deaths per row so far)."""
        self.attempts[block] = self.attempts.get(block, 0) + 1
        row = self.in_flight.pop(block, None)
        if row is not None:  # the last attempt died while this row ran
            kills = self.kills.setdefault(block, {})
            kills[row] = kills.get(row, 0) + 1
        return self.attempts[block], dict(self.kills.get(block, {}))

    def started(self, block: str, row: int) -> None:
        self.in_flight[block] = row

    def end(self, block: str) -> None:
        """The block was labeled: forget it (a run of 50M rows has 200k blocks)."""
        for d in (self.attempts, self.in_flight, self.kills):
            d.pop(block, None)


def start(run_id: str):
    """Create this run's state actor (on the driver). Model actors get its handle."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(RunState).options(name=f"adainfer-run-{run_id}").remote()


def register_actor(state) -> None:
    """Called once by each model actor: the node it runs on (for _run.json: which nodes did work)."""
    import ray

    if state is not None:
        state.add_actor.remote(ray.get_runtime_context().get_node_id())


def add_engine_time(state, seconds: float) -> None:
    """Model time of one call (the report prices full depth from it, not from whole wall time)."""
    if state is not None:
        state.add_engine_seconds.remote(seconds)


def add_rows(state, rows: int, errors: int, layers_skipped: float) -> None:
    """A model actor labeled a batch (the driver's progress lines read the sums, job.progress)."""
    if state is not None:
        state.add_rows.remote(rows, errors, layers_skipped)


def timestamp() -> float:
    """Wall-clock seconds since the epoch, for the run's timeline and start/end times: marks are
    compared across processes and nodes, which perf_counter cannot do (durations use perf_counter)."""
    return time.time()


def mark(state, event: str, last: bool = False) -> None:
    """A model actor reached `event` ("actor_start", "actor_ready", "first_labels", "last_labels")
    now: the run keeps the earliest time, or with last=True the latest. Wall-clock time, so that the
    driver can count it from the command's start; on a cluster it carries the skew between the
    nodes' clocks (NTP: milliseconds)."""
    if state is not None:
        state.mark.remote(event, timestamp(), last)


def block_key(ids) -> str:
    return hashlib.blake2b("\x00".join(map(str, ids)).encode(), digest_size=16).hexdigest()


def label_block(state, ids, rows: list[int], errors: list, label) -> None:
    """Label `rows` of a block with `label(rows)`; on a retried block, one row at a time (see top)."""
    import ray

    if state is None:
        label(rows)
        return
    key = block_key(ids)
    attempt, kills = ray.get(state.begin.remote(key))
    if attempt == 1:
        label(rows)
    else:
        for i in rows:
            if kills.get(i, 0) >= ROW_KILL_LIMIT:
                errors[i] = f"labeling this row killed the model actor {kills[i]} times: given up"
                continue
            ray.get(state.started.remote(key, i))  # recorded before the row runs: it may kill us
            label([i])
    state.end.remote(key)


def crash_drill(texts) -> None:
    """Reliability tests kill the actor on a chosen row: ADAINFER_CRASH_ON_TEXT=<substring>."""
    poison = os.environ.get("ADAINFER_CRASH_ON_TEXT")
    if poison and any(poison in t for t in texts):
        os._exit(1)
