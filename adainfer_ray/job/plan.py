"""The one place the driver resolves what a run labels with: the task, the model (its checks, hash,
depth and context limit), the exit policy (resolved and checked against those weights and that
prompt) and the dtype the actors will compute in. Actors, `label()` and the job receive the result
as plain objects and never resolve these again."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from adainfer_ray import io
from adainfer_ray.job.config import EMBEDDED_CORPUS, CheckedInput, JobConfig, JobError, check_input


def build_task(cfg: JobConfig):
    """The task from the flags, demonstrations read here on the driver (actors get the Task itself)."""
    from adainfer_ray.prompts import make_task

    demos = None
    if cfg.demos:
        import fsspec

        try:
            with fsspec.open(cfg.demos, "r", encoding="utf-8") as f:
                demos = [(d["text"], d["label"]) for d in map(json.loads, filter(str.strip, f))]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JobError(f"cannot read --demos {cfg.demos}: {type(e).__name__}: {e}; "
                           'expected JSON lines of {"text": ..., "label": ...}') from e
    try:
        return make_task(cfg.task, labels=cfg.labels, template=cfg.template, demos=demos)
    except ValueError as e:  # an unknown task, a template without {text}, demos with unknown labels
        raise JobError(str(e)) from e


def checked_policy(spec: str, task, model_id: str, model_hash: str, num_layers: int, promise: str = "agreement"):
    """--policy (`default`, `full`, or a folder / URI from calibration) as an ExitPolicy, checked
    against these weights and this prompt: every policy the job uses comes through here. `default`
    is the shipped policy made under `promise` (--promise)."""
    from adainfer_ray.policy import find_policy

    policy = find_policy(spec, model_id, task.name, promise)
    policy.check_compatible(model_hash, task.fingerprint(), num_layers)
    return policy


def calibration_prior(spec: str | None, facts: dict, promise: str, log=print):
    """--prior as the ExitPolicy calibrate.calibrate takes as a candidate, or None. facts: the model
    and task it must match (model_id, model_hash, num_layers, task, task_fingerprint) and the
    calibration's input. `default`: the shipped policy under `promise` when one matches (none ships
    for most models and prompts: then no prior, said in one line); a folder: that policy, refused
    if it does not match. A prior calibrated on this same input is left out: its rule was chosen on
    these rows, and the test part must be independent of what chose the rule."""
    from adainfer_ray.policy import PolicyError, find_policy, shipped_policy_name

    if spec in (None, "none"):
        return None
    try:
        prior = find_policy(spec, facts["model_id"], facts["task"], promise)
        prior.check_compatible(facts["model_hash"], facts["task_fingerprint"], facts["num_layers"])
    except (PolicyError, OSError) as e:
        if spec != "default":
            raise PolicyError(f"--prior {spec}: {e}") from e
        log("calibration: no shipped policy matches this model and prompt, so the rule is learned from the "
            "sample alone (--prior)")
        return None
    if prior.never_exits:
        return None
    if prior.metadata.get("input") and prior.metadata.get("input") == facts.get("input"):
        log(f"calibration: --prior {spec} was calibrated on this same input: left out")
        return None
    prior.metadata["prior_name"] = (shipped_policy_name(facts["model_id"], facts["task"], promise)
                                    if spec == "default" else spec)
    return prior


def run_precision(device_kind: str, dtype: str) -> str:
    """The dtype actors on `device_kind` compute in, as a name, from the rule that picks it."""
    from adainfer_ray.models import weights_dtype

    return str(weights_dtype(device_kind, dtype)).removeprefix("torch.")


@dataclass
class Labeling:
    """What every labeling stage needs, resolved on the driver: the task, the checked policy and the
    model's facts (hash, depth, FLOP dimensions, the prompt's shared prefix length)."""

    task: object  # prompts.Task
    policy: object  # policy.ExitPolicy
    model_id: str
    model_hash: str
    num_layers: int
    dims: object  # flops.ModelDims
    prefix_tokens: int
    prior: object = None  # --calibrate: calibration_prior's policy (or None)


def plan_labeling(cfg: JobConfig, policy_spec: str | None = None, log=print) -> Labeling:
    """Task, model and policy for `cfg` (policy_spec: --policy, default cfg.policy). Raises the
    errors jobs/*.py print as one line (JobError, PolicyError, UnsupportedModelError, ...)."""
    from transformers import AutoTokenizer  # after the cheap checks: importing torch takes seconds

    from adainfer_ray.flops import ModelDims
    from adainfer_ray.models import check_model_dir, context_limit, model_fingerprint, model_id, resolve_model_dir
    from adainfer_ray.prompts import PromptEncoder

    model_dir = resolve_model_dir(cfg.model)
    config = check_model_dir(model_dir, cfg.trust_remote_code).get_text_config()  # Gemma 3 nests the decoder's
    task = build_task(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
        encoder = PromptEncoder(task, tokenizer, context_limit(config))
    except (OSError, ValueError) as e:  # no tokenizer, verbalizers sharing a token, a prefix too long...
        raise JobError(str(e)) from e
    dims = ModelDims.from_config(config)
    model_hash = model_fingerprint(model_dir)
    policy = checked_policy(policy_spec or cfg.policy, task, model_id(cfg.model), model_hash, dims.layers,
                            cfg.promise)
    facts = {"model_id": model_id(cfg.model), "model_hash": model_hash, "num_layers": dims.layers,
             "task": task.name, "task_fingerprint": task.fingerprint(), "input": cfg.input}
    prior = calibration_prior(cfg.prior, facts, cfg.promise, log) if cfg.calibrate else None  # a bad folder fails here
    return Labeling(task=task, policy=policy, model_id=facts["model_id"], model_hash=model_hash,
                    num_layers=dims.layers, dims=dims, prefix_tokens=len(encoder.prefix_ids), prior=prior)


@dataclass
class Plan(Labeling):
    """What the driver resolved for a job before any actor starts; actors receive these objects, never paths."""

    files: list[str] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)  # the input root each file was found under
    format: str = "auto"
    has_id_column: bool = True
    actors: int | tuple[int, int] = 1  # --actors, parsed once (config.parse_actors)
    gold_one_based: bool = False
    embedded_rows: list | None = field(default=None, repr=False)  # the embedded corpus, read here


def preflight(cfg: JobConfig, log=print, checked: CheckedInput | None = None) -> Plan:
    """Every check that can fail fast runs here, on the driver, before Ray starts any actor. What is
    wrong with the user's input or settings is raised as one of the errors jobs/*.py print as one
    line (JobError, io.InputError, PolicyError, UnsupportedModelError, FileNotFoundError).
    `checked`: check_input's result, when it ran already."""
    from adainfer_ray.job.dataset import gold_is_one_based, read_file
    from adainfer_ray.policy import PolicyError

    checked = checked or check_input(cfg)
    if cfg.calibrate and cfg.policy not in ("default", "full"):
        raise PolicyError("--calibrate makes its own policy: leave out --policy (or use jobs/calibrate.py "
                          "once and --policy FOLDER for later runs)")
    # --calibrate: full depth until calibration makes the real policy (or finds it on resume).
    labeling = plan_labeling(cfg, "full" if cfg.calibrate else None, log)
    io.check_writable(cfg.output)
    has_id = checked.present["--id-column"]
    embedded = None
    if cfg.input == str(EMBEDDED_CORPUS) or cfg.input.startswith("memory://"):
        # The embedded corpus and memory:// live on this machine only: read here, hand the rows to Ray.
        embedded = [table for path, root in zip(checked.files, checked.roots)
                    for table in read_file(path, root, checked.format, cfg, has_id)]
    one_based = gold_is_one_based(checked.files, checked.format, cfg, labeling.task) if cfg.label_column else False
    return Plan(**vars(labeling), files=checked.files, roots=checked.roots, format=checked.format,
                has_id_column=has_id, actors=checked.actors, gold_one_based=one_based, embedded_rows=embedded)


def warn_on_precision(policy, device_kind: str, dtype: str, log) -> None:
    """A policy is calibrated at one precision; exit decisions at another can differ a little."""
    promise = policy.promise
    if not promise or not promise.get("dtype"):
        return
    now = run_precision(device_kind, dtype)
    if promise["dtype"] != now:
        log(f"warning: this policy was calibrated at {promise['dtype']} on {promise.get('device')}, and this run "
            f"computes in {now}: exits can differ slightly from what calibration measured (use --dtype "
            f"{promise['dtype']}, or calibrate at this precision with --calibrate N)")
