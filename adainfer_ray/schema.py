"""The output contract of `jobs/classify.py`: one Parquet row per input row, plus a JSON sidecar.

Everything downstream (cost reports, resumption, tests) reads these names, so they live in one place.
"""

import pyarrow as pa

# One row per input row. FLOP columns are per item; fractions are of `flops_full`.
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),              # the input id, or one derived from source file + row position
    ("label", pa.string()),           # predicted label name; null when `error` is set
    ("label_score", pa.float32()),    # confidence of `label` at the exit layer (probability in [0, 1])
    ("label_probs", pa.list_(pa.float32())),  # every label's probability at the exit layer, in the order of
                                      # _run.json `labels` (sums to 1; label_score is its largest); null on error
    ("exit_layer", pa.int32()),       # layers run, 1..num_layers; null when `error` is set
    ("num_layers", pa.int32()),       # the model's depth
    ("flops_used", pa.float64()),     # what actually ran: layers to the exit, exit-feature heads, final head
    ("flops_full", pa.float64()),     # reference: the whole prompt through every layer + LM head, no reuse
    ("compute_saved", pa.float64()),  # 1 - flops_used / flops_full  (= exit_saved + prefix_saved)
    ("exit_saved", pa.float64()),     # share of flops_full saved by stopping early (net of exit-feature cost)
    ("prefix_saved", pa.float64()),   # share of flops_full saved by reusing the shared few-shot prefix
    ("num_tokens", pa.int32()),       # prompt tokens of this item (prefix included)
    ("truncated", pa.bool_()),        # the text was cut to fit the model's context
    ("full_label", pa.string()),      # full-depth label for audited rows (--audit-fraction), else null
    ("gold_label", pa.string()),      # the input's gold label (as a label name) with --label-column, else null
    ("calibration", pa.bool_()),      # in the --calibrate sample: labeled at full depth, and it made the policy
    ("after_drift", pa.bool_()),      # labeled after the online audit showed the promise broken (--on-drift)
    ("error", pa.string()),           # null when fine; what went wrong otherwise
])

OUTPUT_COLUMNS = OUTPUT_SCHEMA.names

# The run sidecar, written next to the Parquet files.
SIDECAR_NAME = "_run.json"
# Keys it holds: model, model_hash, policy, task, template, labels, flags, ray_version,
# device ("cpu" / "cuda"), gpu_name (or null), num_gpus (GPUs the job held), num_actors,
# drift (null, or when and why the online audit made the run act: --on-drift), audit (its counts),
# start_time, end_time (ISO 8601 UTC), wall_s, rows, errors, rows_per_s, output; first_labels_s
# (seconds from the command's start until the first batch of labels was done) and, per run, timeline
# (seconds from the command's start to each step: preflight done, Ray ready, first actor started, its
# model loaded, first and last batch labeled).
