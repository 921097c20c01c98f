#!/usr/bin/env bash
# The whole GPU check in one go (about 5 minutes on one H100/H200 class GPU), ready for the first
# time a GPU is lent: the benchmark's headline settings on random-weight models of real shapes,
# bf16, with exit depths replayed from the README's CPU run (docs/benchmark/benchmark.json, real
# text, real policy). Weights cannot travel; a layer's cost depends only on its shape.
#
#   bash jobs/gpu_check.sh [OUT_DIR]      # writes OUT_DIR/<shape>/benchmark.{json,md} and OUT_DIR/gpu_check.json
#
# Each shape runs under its own time limit, so one slow shape cannot take the others down.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
SETTINGS="hf_prefix_cached engine_full_prefix exit_regrouped_prefix"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true

run_shape() {  # shape items limit_s
  local shape=$1 items=$2 limit=$3
  timeout "$limit" python jobs/benchmark.py --device cuda --shape "$shape" --limit "$items" \
      --rounds 3 --warmup 64 --settings $SETTINGS --out "$OUT/$shape" > "$OUT/$shape.log" 2>&1
  echo "$shape exit status $?" >> "$OUT/status.txt"
}

: > "$OUT/status.txt"
run_shape qwen2.5-1.5b 4096 100
run_shape llama3-8b 2048 150

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"status": out.joinpath("status.txt").read_text().split("\n")}
for shape in ("qwen2.5-1.5b", "llama3-8b"):
    f = out / shape / "benchmark.json"
    if not f.exists():
        summary[shape] = None
        continue
    r = json.loads(f.read_text())
    summary[shape] = {"gpu": r["machine"].get("gpu"), "items": r["data"]["items"], "targets": r["targets"],
                      "settings": {s: {k: v[k] for k in ("items_per_s", "speedup_vs_ref_paired", "realized_fraction_paired",
                                                            "mean_exit_layer", "ideal_speedup", "fraction_of_matmul",
                                                            "padding_share", "peak_mem_mb") if k in v}
                                   for s, v in r["settings"].items()}}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
