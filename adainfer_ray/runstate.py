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

The same actor keeps the online audit (online_audit.py): each labeled block's audit counts, and the
decision, read by the model actors as each block begins (--on-drift).

Losing it must not lose the run. It is placed on the driver's node (under `ray job submit`, the
head), which a job cannot outlive anyway, so a lost worker node never takes it; and every call from
a model actor tolerates its loss all the same: the run then goes on without poison-row accounting
and without the online audit, and the end summary says so.
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
        self.audit, self.on_drift = None, "warn"  # online_audit.OnlineAudit once labeling starts (set_audit)
        self.counted: set[str] = set()  # blocks whose audit counts are in: a retried block counts once
        self.rows_labeled = 0  # rows of blocks labeled so far (the drift record says how many came before)
        self.drift: dict | None = None  # when and why the run acted, once the audit showed the promise broken
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

    def begin(self, block: str) -> tuple[int, dict[int, int], bool]:
        """A model actor starts `block`: returns (attempt number, actor deaths per row so far, whether
        the audit has shown the promise broken)."""
        self.attempts[block] = self.attempts.get(block, 0) + 1
        row = self.in_flight.pop(block, None)
        if row is not None:  # the last attempt died while this row ran
            kills = self.kills.setdefault(block, {})
            kills[row] = kills.get(row, 0) + 1
        return self.attempts[block], dict(self.kills.get(block, {})), self.drift is not None

    def set_audit(self, audit, on_drift: str) -> None:
        """The online audit of the policy the labeling uses (None: it promises nothing), and --on-drift."""
        self.audit, self.on_drift = audit, on_drift

    def add_audit(self, block: str, rows: int, counts: dict) -> None:
        """A labeled block's rows and audit counts (OnlineAudit.add's arguments): once per block."""
        if block in self.counted:
            return
        self.counted.add(block)
        self.rows_labeled += rows
        if self.audit is not None and self.drift is None and self.audit.add(**counts):
            self.drift = {"action": self.on_drift, "at": timestamp(), "rows_labeled_before": self.rows_labeled,
                          "why": "the online audit's lower bound exceeds epsilon", **self.audit.to_dict()}

    def audit_state(self) -> dict | None:
        """The audit's running counts and bound, and the drift record once the run acted (None: no audit)."""
        if self.audit is None:
            return None
        return {**self.audit.to_dict(), "drift": self.drift}

    def started(self, block: str, row: int) -> None:
        self.in_flight[block] = row

    def end(self, block: str) -> None:
        """The block was labeled: forget it (a run of 50M rows has 200k blocks)."""
        for d in (self.attempts, self.in_flight, self.kills):
            d.pop(block, None)


def start(run_id: str):
    """Create this run's state actor on the driver's node (see top). Model actors get its handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_restarts=0)(RunState).options(
        name=f"adainfer-run-{run_id}", scheduling_strategy=here).remote()


def lost(error: BaseException) -> bool:
    """Whether `error` says the run-state actor is gone (its node died, or it was killed)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(error, (ActorDiedError, ActorUnavailableError, RayActorError))


def ask(state, method: str, *args, default=None):
    """ray.get(state.<method>(*args)), or `default` once the run-state actor is lost: it costs the
    poison-row accounting and the online audit, never the run."""
    import ray

    try:
        return ray.get(getattr(state, method).remote(*args))
    except Exception as e:  # noqa: BLE001 - only the actor's loss is tolerated
        if lost(e):
            return default
        raise


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


def begin_block(state, ids) -> tuple[str, int, dict[int, int], bool]:
    """(block key, attempt, actor deaths per row, drifted) for a block a model actor starts; without a
    run state (label() stage, or lost) every block is a first attempt and no drift is known."""
    key = block_key(ids)
    if state is None:
        return key, 1, {}, False
    return (key, *ask(state, "begin", key, default=(1, {}, False)))


def label_block(state, key: str, attempt: int, kills: dict[int, int], rows: list[int], errors: list,
                label) -> None:
    """Label `rows` of a block with `label(rows)`; on a retried block, one row at a time (see top)."""
    if attempt == 1:
        label(rows)
    else:
        for i in rows:
            if kills.get(i, 0) >= ROW_KILL_LIMIT:
                errors[i] = f"labeling this row killed the model actor {kills[i]} times: given up"
                continue
            ask(state, "started", key, i)  # recorded before the row runs: it may kill us
            label([i])
    if state is not None:
        state.end.remote(key)  # fire and forget: a lost actor's error is never fetched


def add_audit(state, key: str, rows: int, counts: dict) -> None:
    """A labeled block's audit counts (fire and forget)."""
    if state is not None:
        state.add_audit.remote(key, rows, counts)


def crash_drill(texts) -> None:
    """Reliability tests kill the actor on a chosen row: ADAINFER_CRASH_ON_TEXT=<substring>; and slow
    each labeling call by ADAINFER_DRILL_SLEEP_S seconds, so that a killed node lands mid-run."""
    pause = float(os.environ.get("ADAINFER_DRILL_SLEEP_S") or 0)
    if pause:
        time.sleep(pause)
    poison = os.environ.get("ADAINFER_CRASH_ON_TEXT")
    if poison and any(poison in t for t in texts):
        os._exit(1)
