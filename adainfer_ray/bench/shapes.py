"""Real shapes, random weights (GPU checks: real weights cannot travel; a layer's cost depends only
on its shape). `shape_workload` builds such a model and replays a real run's item lengths and exit
depths on it: the engine computes the probe features as in production, and only the stop decision
is looked up (`baselines.ReplayEngine`), so no policy is fitted for these runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from adainfer_ray.bench.workload import Workload
from adainfer_ray.rules import linear_rule
from adainfer_ray.features import LinearProbes

# Configs of public models (their config.json, the fields that set the cost of a layer).
SHAPES = {
    "llama3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": True},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True},
    "tiny": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512,
             "tie_word_embeddings": True},  # for the CPU test of this code path
}


def shape_model(name: str, device: torch.device):
    """A random-weight model of shape `name`, built on the device in its dtype (bf16 on CUDA)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from adainfer_ray.models import pick_device, wrap_model

    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}: choose from {', '.join(SHAPES)}")
    spec = dict(SHAPES[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    _, dtype = pick_device(str(device))
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: an 8B model is minutes of host work otherwise
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return wrap_model(model, None, f"random-{name}", "random")


def shape_workload(name: str, replay: str | Path, device: torch.device, limit: int | None) -> Workload:
    """Random token ids with the replayed item lengths, and the replayed exit depths scaled to the
    shape's layer count (the same share of the layers), cycled to `limit` items."""
    plan = json.loads(Path(replay).read_text()).get("exit_plan")
    if not plan:
        raise ValueError(f"{replay} holds no exit_plan (written by a CPU benchmark run with exit_regrouped_prefix)")
    lm = shape_model(name, device)
    L, C = lm.num_layers, 2
    n = limit or len(plan["item_tokens"])
    lens = [plan["item_tokens"][i % len(plan["item_tokens"])] for i in range(n)]
    share = np.array([plan["exit_layer"][i % len(plan["exit_layer"])] for i in range(n)]) / plan["num_layers"]
    min_layer = max(1, round(plan["min_layer"] * L / plan["num_layers"]))
    exits = np.clip(np.round(share * L), min_layer, L).astype(int)
    rng = np.random.default_rng(0)
    V = lm.config.vocab_size
    items = [rng.integers(100, V, size=k).tolist() for k in lens]
    prefix = rng.integers(100, V, size=plan["prefix_tokens"]).tolist()
    # Calibration's own rule form, never asked (decisions are replayed); random probes, so the
    # engine computes probe features at their production cost.
    policy = linear_rule("probe", L, min_layer)
    policy.probes_ = LinearProbes()
    D = lm.config.hidden_size
    policy.probes_.coef_ = rng.standard_normal((L, C, D)).astype(np.float32) / D**0.5
    policy.probes_.intercept_ = np.zeros((L, C), np.float32)
    return Workload(lm, items, prefix, [5, 9], None, policy,
                    f"exit depths replayed from {replay} (probe features computed, decisions looked up)",
                    {"path": f"replay of {replay}", "task": "replay"}, plan=exits)
