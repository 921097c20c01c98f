"""Ray for the job: joining a cluster or starting a local Ray (overlapped with the preflight), how
the model actors are placed (Resources), and the one place model actors are started."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from adainfer_ray import runstate
from adainfer_ray.job.config import JobConfig, check_input
from adainfer_ray.job.plan import preflight


def init_ray():
    import ray

    if not ray.is_initialized():
        # Inside `ray job submit` RAY_ADDRESS points at the cluster; otherwise start a local Ray.
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, include_dashboard=False)
    return ray


def starts_local_ray() -> bool:
    """Whether init_ray will start a Ray of its own here (rather than join one: RAY_ADDRESS, or this
    process already connected)."""
    import ray

    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")


def preflight_and_init_ray(cfg: JobConfig, log=print, timeline: dict | None = None, then=None):
    """The preflight, and Ray ready: (plan, ray, then(plan)). `then` runs right after the preflight,
    before Ray is joined (the job's resume checks: a refused rerun never reaches a cluster either);
    `timeline` gets the time the preflight and Ray were done.

    Starting a local Ray is mostly waiting on the processes it spawns (about 4 s on an idle 2-core
    machine); the preflight is mostly importing torch and transformers and loading the tokenizer
    (about 3 s). When this process starts its own Ray the two run at once: the preflight in a
    thread, ray.init in the main thread, where it installs its SIGTERM handler (from another
    thread Ray warns and skips it). The cheap checks run first, so a wrong path, column or flag
    never starts Ray; a preflight that fails later shuts down the Ray it overlapped with before
    its one-line error is raised. When joining a cluster (RAY_ADDRESS, `ray job submit`) the
    preflight runs first, as before: connecting is quick, and a wrong setting never reaches it.
    (Importing ray.data in the thread too was tried: Ray Data then warned of "no available CPUs"
    at the end of 2 runs in 3, so it is imported where it is used.)"""
    import threading

    timeline = {} if timeline is None else timeline
    checked = check_input(cfg)
    then = then or (lambda plan: None)
    outcome = {}

    def work():
        try:
            outcome["plan"] = preflight(cfg, log, checked)
            outcome["after"] = then(outcome["plan"])
            timeline["preflight_done"] = runstate.timestamp()
        except BaseException as e:  # noqa: BLE001 - raised again in the main thread, below
            outcome["error"] = e

    own_ray = starts_local_ray()
    thread = threading.Thread(target=work, name="adainfer-preflight", daemon=True)
    thread.start()
    if not own_ray:  # joining a cluster: the preflight first, so that a wrong setting never reaches it
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
    ray = init_ray()
    timeline["ray_ready"] = runstate.timestamp()
    thread.join()
    if "error" in outcome:  # only a Ray of our own can be here: shut it down before the one-line error
        ray.shutdown()
        raise outcome["error"]
    return outcome["plan"], ray, outcome["after"]


@dataclass
class Resources:
    """How the model actors are placed, decided once from the cluster."""

    gpus_per_actor: float
    actors: int | tuple[int, int]
    threads: int | None  # torch threads per CPU actor: the node's cores shared by the actors on it

    @property
    def device_kind(self) -> str:
        return "cuda" if self.gpus_per_actor else "cpu"

    @property
    def max_actors(self) -> int:
        return self.actors if isinstance(self.actors, int) else self.actors[1]


def threads_per_actor(node_cpus: int, actors_on_node: int) -> int:
    """Torch threads for one CPU actor: its node's cores, shared by the actors placed there (more
    threads than cores only makes them wait on each other)."""
    return max(1, node_cpus // max(1, actors_on_node))


def plan_resources(cfg: JobConfig, actors: int | tuple[int, int], ray) -> Resources:
    """Placement from the live cluster; `actors` is --actors as config.parse_actors read it."""
    total = ray.cluster_resources()
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if total.get("GPU", 0) > 0 else 0.0)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = min((int(n["Resources"].get("CPU", 1)) for n in nodes), default=1)
    most = actors if isinstance(actors, int) else actors[1]
    per_node = math.ceil(most / max(1, len(nodes)))
    return Resources(gpus, actors, None if gpus else threads_per_actor(node_cpus, per_node))


def map_classifier(ds, cfg: JobConfig, task, policy, res: Resources, **actor_kwargs):
    """The one place model actors are started: labeling, tracing and the public `label` stage."""
    import ray

    from adainfer_ray.job.actor import Classifier

    # The actors get this driver's ADAINFER_* settings (the model cache, the crash drill in
    # Classifier): on a cluster started elsewhere, workers inherit `ray start`'s environment instead.
    env = {k: v for k, v in os.environ.items() if k.startswith("ADAINFER_")}
    pool = ray.data.ActorPoolStrategy(size=res.actors) if isinstance(res.actors, int) else \
        ray.data.ActorPoolStrategy(min_size=res.actors[0], max_size=res.actors[1])
    return ds.map_batches(
        Classifier, fn_constructor_kwargs={"cfg": cfg, "task": task, "policy": policy, "threads": res.threads,
                                           **actor_kwargs},
        batch_size=cfg.batch_size, batch_format="numpy", compute=pool,
        num_gpus=res.gpus_per_actor, num_cpus=None if res.gpus_per_actor else 1,
        runtime_env={"env_vars": env} if env else None,
        # No retry settings needed: Ray Data restarts a dead actor and runs the blocks it held again.
    )
