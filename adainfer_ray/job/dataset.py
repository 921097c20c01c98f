"""Reading the input as a Ray Dataset (fsspec + pyarrow through io.read_rows: derived ids, gold
labels, and rows an earlier run already wrote left out), and writing the output rows."""

from __future__ import annotations

from adainfer_ray import io, resume
from adainfer_ray.job.config import JobConfig
from adainfer_ray.schema import OUTPUT_SCHEMA

# Blocks of at most this many bytes: a large file then streams to the actors as many blocks (Ray
# Data's default, 128 MiB, would make a 100 MB JSONL file one block: one actor, no progress shown).
BLOCK_BYTES = 4 << 20


def read_file(path: str, root: str, fmt: str, cfg: JobConfig, has_id_column: bool):
    """One input file as tables of io.INPUT_SCHEMA: the one reader every step uses."""
    return io.read_rows(path, fmt, cfg.text_column, cfg.id_column if has_id_column else None,
                        cfg.label_column, cfg.group_column, cfg.columns, root=root)


def _read_files(batch, fmt, cfg, has_id_column, done=None):
    """Rows of each file in the batch, less those an earlier run already wrote (`done`)."""
    for path, root in zip(batch["path"], batch["root"]):
        for table in read_file(str(path), str(root), fmt, cfg, has_id_column):
            yield resume.drop_done(table, done) if done is not None else table


def read_dataset(cfg: JobConfig, plan, ray, done=None):
    """The input as a Ray Dataset of io.INPUT_SCHEMA rows, less the ids in `done` (sorted id_keys).
    --limit counts the input's first rows before done ones are dropped, so that a resumed or
    calibrated run labels the same rows as one that ran straight through."""
    ray.data.DataContext.get_current().target_max_block_size = BLOCK_BYTES
    done_ref = ray.put(done) if done is not None and len(done) else None
    drop_while_reading = done_ref if cfg.limit is None else None  # cheapest: never ship a done row
    if plan.embedded_rows is not None:
        tables = [resume.drop_done(t, drop_while_reading) if drop_while_reading is not None else t
                  for t in plan.embedded_rows]
        ds = ray.data.from_arrow(tables or [io.INPUT_SCHEMA.empty_table()])
    else:
        # One read task per file. Half a CPU each (reading is light) also keeps Ray Data from fusing
        # the reads into the model actors, where one actor call would get a bundle of up to
        # --batch-size files: one actor reading everything, and a crash rerunning all of it.
        items = [{"path": f, "root": r} for f, r in zip(plan.files, plan.roots)]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _read_files, batch_size=1, batch_format="numpy", num_cpus=0.5,
            fn_kwargs=dict(fmt=plan.format, cfg=cfg, has_id_column=plan.has_id_column, done=drop_while_reading))
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)
        if done_ref is not None:
            ds = ds.map_batches(resume.drop_done, fn_args=(done_ref,), batch_format="pyarrow", num_cpus=0.5)
    return ds


def estimate_rows(cfg: JobConfig, plan) -> int:
    """About how many rows the job reads (after --limit): enough to size the audit sample."""
    rows = (sum(len(t) for t in plan.embedded_rows) if plan.embedded_rows is not None
            else io.estimate_rows(plan.files, plan.format))
    return min(rows, cfg.limit) if cfg.limit is not None else rows


def gold_is_one_based(files, fmt, cfg: JobConfig, task, peek: int = 2000) -> bool:
    """Integer gold labels are 0-based unless the first rows use 1..num_labels and never 0 (AG News)."""
    values = []
    for table in io.read_rows(files[0], fmt, cfg.text_column, None, cfg.label_column, columns=cfg.columns):
        values += [v for v in table.column("gold_label").to_pylist() if v is not None]
        if len(values) >= peek:
            break
    ints = [int(v) for v in values if v.strip().lstrip("-").isdigit()]
    return bool(ints) and len(ints) == len(values) and min(ints) >= 1 and max(ints) == len(task.labels)


class _DropCpuWarning:
    """logging filter: drops Ray Data's "no available CPUs ... will hang" line and nothing else."""

    def filter(self, record) -> bool:
        return "will hang unless more CPUs" not in record.getMessage()


def _quiet_cpu_warning():
    """While the write runs, Ray Data's "will hang" warning is dropped: it reads a snapshot of free
    CPUs, and our model actors hold CPUs by design (--actors N on an N-core node takes them all), so
    at the end of a run it fires for our own actors, not for a hang. (The cost: on a cluster whose
    CPUs are all taken by someone else before the run starts, this early hint is lost too; Ray Data's
    progress then shows the actor pool waiting.)"""
    import contextlib
    import logging

    @contextlib.contextmanager
    def installed():
        logger, dropper = logging.getLogger("ray.data.dataset"), _DropCpuWarning()
        logger.addFilter(dropper)
        try:
            yield
        finally:
            logger.removeFilter(dropper)

    return installed()


def write_output(ds, output: str, started) -> None:
    """The labeled rows as Parquet files in `output`; with no rows at all, an empty table that every
    reader can open. `started` (a datetime) names memory:// parts."""
    out_fs, out_root = io.output_fs(output)
    if "memory" in (out_fs.protocol if isinstance(out_fs.protocol, tuple) else (out_fs.protocol,)):
        import pyarrow.parquet as pq  # memory:// lives in this process only: write from here

        for k, batch in enumerate(ds.iter_batches(batch_format="pyarrow", batch_size=None)):
            with out_fs.open(f"{out_root.rstrip('/')}/part-{started:%Y%m%dT%H%M%S}-{k:05d}.parquet", "wb") as f:
                pq.write_table(batch, f)
    else:
        # Writing is light: half a CPU per write task, as for the reads. At 1 CPU, the last write task and
        # a model actor being torn down held both CPUs of a 2-core machine when Ray Data, having finished
        # the write, re-checks the cluster (write_parquet materialises, then runs the result once more),
        # and it warned that "the Dataset job will hang": a run that had ended, reported as a hang.
        with _quiet_cpu_warning():
            ds.write_parquet(output, ray_remote_args={"num_cpus": 0.5})
    if not io.output_files(output):
        io.write_parquet(output, "empty.parquet", OUTPUT_SCHEMA.empty_table())
