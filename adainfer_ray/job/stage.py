"""`label(ds, ...)`: the job's labeling step as one stage of a user's own Ray Data pipeline."""

from __future__ import annotations

from adainfer_ray.job.cluster import init_ray, map_classifier, plan_resources
from adainfer_ray.job.config import JobConfig, parse_actors
from adainfer_ray.job.plan import plan_labeling
from adainfer_ray.schema import OUTPUT_SCHEMA


def label(ds, *, text_column: str = "text", id_column: str | None = None, task: str = "sentiment",
          labels: list[str] | None = None, template: str | None = None, model: str = "smollm2-135m",
          policy: str = "default", device: str = "auto", dtype: str = "auto", actors: str | int = 1,
          gpus_per_actor: float | None = None, batch_size: int = 256, audit_fraction: float = 0.01,
          seed: int = 0, trust_remote_code: bool = False):
    """Early-exit labeling as one stage of your own Ray Data pipeline: returns `ds` with the output
    columns (schema.OUTPUT_SCHEMA: label, label_probs, exit_layer, compute_saved, ...) added to its own.
    `label_probs` holds every label's probability at the exit layer, in the order of `labels` (or the
    task's own labels: prompts.make_task(task).labels).

        ds = ray.data.read_parquet("s3://bucket/reviews/")
        ds = adainfer_ray.label(ds, text_column="body", id_column="review_id")
        ds.write_parquet("s3://bucket/labels/")

    `policy`: "default" (shipped for the default model and built-in tasks), "full", or a folder
    from jobs/calibrate.py. Without `id_column`, the audit sample is drawn by text.
    """
    cfg = JobConfig(text_column=text_column, id_column=id_column or "", task=task, labels=labels, template=template,
                    model=model, policy=policy, device=device, dtype=dtype, actors=str(actors),
                    gpus_per_actor=gpus_per_actor, batch_size=batch_size, audit_fraction=audit_fraction, seed=seed,
                    trust_remote_code=trust_remote_code)
    pool_size = parse_actors(cfg.actors)
    labeling = plan_labeling(cfg)  # task, model checks and policy, as the job's preflight resolves them
    keep = [c for c in ds.columns() if c not in set(OUTPUT_SCHEMA.names)]
    return map_classifier(ds, cfg, labeling.task, labeling.policy, plan_resources(cfg, pool_size, init_ray()),
                          audit_rate=audit_fraction, text_column=text_column, id_column=id_column, keep_columns=keep)
