"""`jobs/benchmark.py --quick` runs end to end and writes sane numbers (never checks speed).

The model is a tiny random Llama saved as a local folder with the default model's tokenizer, so the
smoke test takes seconds; the exit policy is calibrated by the benchmark itself (--policy fit, through
`calibrate.calibrate`, as `classify --calibrate` does).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adainfer_ray.bench import QUICK_ITEMS, SETTINGS

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = ("items_per_s", "speedup_vs_ref", "speedup_vs_ref_paired", "mean_exit_layer", "ideal_speedup", "realized_fraction",
                 "accuracy", "agreement", "peak_mem_mb", "achieved_flops_per_s")
SENTENCES = [
    ("a warm , funny and moving film", 1), ("the plot is a dull , plodding mess", 0),
    ("one of the best performances of the year", 1), ("i wanted my money back", 0),
    ("sharp writing and a great cast", 1), ("it never finds its footing", 0),
    ("a delight from start to finish", 1), ("boring , long and badly acted", 0),
    ("beautifully shot and deeply felt", 1), ("the jokes fall flat every time", 0),
    ("an unexpected joy", 1), ("a waste of a talented director", 0),
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 4-layer random Llama with the default model's tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from adainfer_ray.models import ensure_default_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_tsv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "dev.tsv"
    # SST-2's format: a header, then `sentence \tlabel` with a trailing space before the tab.
    path.write_text("sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in SENTENCES))
    return path


def run_quick(tmp_path, model_dir, tsv, *extra):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "jobs" / "benchmark.py"), "--quick", "--model", str(model_dir),
           "--data", str(tsv), "--policy", "fit", "--fit-data", str(tsv), "--threads", "1",
           # 12 items can guarantee no tighter promise than 50%: without it calibration writes a
           # full-depth policy and the early-exit settings would measure nothing.
           "--fit-agreement", "0.5",
           "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_quick_benchmark_writes_sane_numbers(tmp_path, tiny_model_dir, tiny_tsv):
    out, proc = run_quick(tmp_path, tiny_model_dir, tiny_tsv)
    result = json.loads((out / "benchmark.json").read_text())
    md = (out / "benchmark.md").read_text()
    assert result["matmul_flops_per_s"] > 0 and math.isfinite(result["matmul_flops_per_s"])
    assert result["machine"]["device"] == "cpu" and result["machine"]["threads"] == 1
    assert result["data"]["items"] == min(QUICK_ITEMS, len(SENTENCES))
    settings = result["settings"]
    assert set(settings) == set(SETTINGS)
    for name in SETTINGS:
        r = settings[name]
        for key in REQUIRED_KEYS:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (name, key, r[key])
        assert r["items_per_s"] > 0 and r["achieved_flops_per_s"] > 0 and r["ideal_speedup"] >= 1.0
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["agreement"] <= 1
        assert 1 <= r["mean_exit_layer"] <= result["model"]["layers"]
        assert r["peak_mem_mb"] >= 0
        assert f"`{name}`" in md  # every setting has a row in the table
    # The engine at full depth computes the model's own answer on the same token ids, and so do the
    # plain-transformers settings, with the prefix cached or not.
    assert settings["hf_prefix_cached"]["agreement"] == 1.0 and settings["hf_forward"]["agreement"] == 1.0
    assert settings["engine_full"]["agreement"] == 1.0
    assert settings["engine_full_prefix"]["agreement"] == 1.0
    assert settings["hf_forward_last"]["agreement"] == 1.0
    # Fixed batches and regrouping exit at the same layers with the same answers; only the schedule differs.
    assert settings["exit_fixed_batches"]["mean_exit_layer"] == settings["exit_regrouped"]["mean_exit_layer"]
    assert settings["exit_fixed_batches"]["agreement"] == settings["exit_regrouped"]["agreement"]
    for target in ("engine_full_prefix_1.25x_ref", "exit_prefix_1.8x_ref", "exit_prefix_realizes_95pct_of_ideal"):
        assert target in result["targets"]
    # Early exit's own contribution is measured against full depth with the same prefix handling.
    assert settings["exit_regrouped_prefix"]["counterpart"] == "engine_full_prefix"
    plan = result["exit_plan"]
    assert plan["exit_layer"] == [int(x) for x in plan["exit_layer"]] and len(plan["item_tokens"]) == len(plan["exit_layer"])
    assert "Machine:" in md and "Command:" in md and (out / "standin-policy" / "policy.json").exists()


def test_shape_run_replays_exit_depths_on_a_random_model(tmp_path, tiny_model_dir, tiny_tsv):
    """The GPU check's code path (`--shape`), on CPU with a tiny shape: random weights, the exit
    depths of a real run replayed at the same share of the layers."""
    out, _ = run_quick(tmp_path, tiny_model_dir, tiny_tsv)
    replay = json.loads((out / "benchmark.json").read_text())["exit_plan"]
    shape_out = tmp_path / "shape"
    cmd = [sys.executable, str(ROOT / "jobs" / "benchmark.py"), "--shape", "tiny", "--device", "cpu",
           "--replay", str(out / "benchmark.json"), "--rounds", "1", "--warmup", "1", "--threads", "1",
           "--settings", "exit_regrouped_prefix", "--out", str(shape_out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((shape_out / "benchmark.json").read_text())
    assert set(result["settings"]) == {"hf_prefix_cached", "engine_full_prefix", "exit_regrouped_prefix"}
    assert result["model"]["shape"] == "tiny" and result["data"]["items"] == len(replay["item_tokens"])
    e = result["settings"]["exit_regrouped_prefix"]
    L_real, L = replay["num_layers"], result["model"]["layers"]
    expect = [min(L, max(round(replay["min_layer"] * L / L_real), round(x * L / L_real), 1)) for x in replay["exit_layer"]]
    assert e["mean_exit_layer"] == pytest.approx(sum(expect) / len(expect))
    assert result["settings"]["engine_full_prefix"]["agreement"] == 1.0  # same model, same answers as (r)


def test_policy_for_another_model_fails_clearly(tmp_path, tiny_model_dir, tiny_tsv):
    """The benchmark takes --policy as the job does: `default` for a model that ships none, and the
    shipped folder given to another model, each end in a one-line error naming why (never a traceback)."""
    from adainfer_ray.bench import DEFAULT_POLICY_DIR

    def stderr_of(policy):
        cmd = [sys.executable, str(ROOT / "jobs" / "benchmark.py"), "--quick", "--model", str(tiny_model_dir),
               "--data", str(tiny_tsv), "--policy", policy, "--out", str(tmp_path / "b")]
        proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc.stderr

    assert f"error: no exit policy ships for model {str(tiny_model_dir)!r} and task 'sentiment'" in stderr_of("default")
    assert "error: policy was made for a 30-layer model; this model has 4" in stderr_of(str(DEFAULT_POLICY_DIR))


def test_help_lists_every_flag_with_defaults():
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "benchmark.py"), "--help"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0
    for flag in ("--data", "--limit", "--out", "--max-batch-tokens", "--hf-batch-tokens", "--device", "--quick",
                 "--rounds", "--policy", "--model"):
        assert flag in proc.stdout
    assert "(default:" in proc.stdout
