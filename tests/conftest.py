"""Shared fixtures: tiny random decoder LMs of every supported family, built from a config (no downloads)."""

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# Ray >= 2.5x turns token authentication on for every cluster once a token exists, and every user who
# ran the quick start has one (~/.ray/auth_token). Tests run that way too, with auth on, but with a
# token of their own in a file that RAY_AUTH_TOKEN_PATH names (Ray reads it before ~/.ray/auth_token):
# the user's token is neither read nor overwritten. Everything started from here (ray.init, the
# cluster of cluster/local.sh, `ray job submit`, the job's driver) inherits it. RAY_AUTH_MODE=token is
# what `eval "$(cluster/local.sh env)"` exports; it is set before anything imports Ray, which reads it
# once per process.
os.environ["RAY_AUTH_MODE"] = "token"
if not os.environ.get("RAY_AUTH_TOKEN"):
    _TOKEN = os.path.join(tempfile.mkdtemp(prefix="ray-token-"), "auth_token")
    with open(os.open(_TOKEN, os.O_WRONLY | os.O_CREAT, 0o600), "w") as _f:
        _f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    os.environ["RAY_AUTH_TOKEN_PATH"] = _TOKEN
    atexit.register(shutil.rmtree, os.path.dirname(_TOKEN), True)

_ROPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
# Windows of 8 tokens are shorter than most test items (3-29 tokens, after a 10-13 token prefix), so
# every windowed family is checked with keys falling out of the window, with and without a prefix.
TINY_CONFIGS = {
    "llama": dict(model_type="llama", **_ROPE),
    "mistral": dict(model_type="mistral", **_ROPE, sliding_window=None),
    "mistral-window": dict(model_type="mistral", **_ROPE, sliding_window=8),
    "qwen2": dict(model_type="qwen2", **_ROPE),
    "qwen3": dict(model_type="qwen3", **_ROPE, head_dim=16),
    "gemma": dict(model_type="gemma", **_ROPE, head_dim=16),
    "gemma2": dict(model_type="gemma2", **_ROPE, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                   initializer_range=0.1),  # larger weights and small caps, so that both caps bite
    "gemma3": dict(model_type="gemma3_text", **_ROPE, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                   final_logit_softcapping=3.0, initializer_range=0.1,
                   layer_types=["sliding_attention", "full_attention"] * 3),
    "gemma3-vision": dict(model_type="gemma3", text_config=dict(  # the text side of Gemma 3 with vision
        **{**_ROPE, "vocab_size": 160}, head_dim=16, sliding_window=8, query_pre_attn_scalar=24, initializer_range=0.1,
        layer_types=["sliding_attention", "full_attention"] * 3), mm_tokens_per_image=4,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), image_token_index=159, boi_token_index=157, eoi_token_index=158),
    "phi3": dict(model_type="phi3", **_ROPE, sliding_window=8, partial_rotary_factor=0.5,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "granite": dict(model_type="granite", **_ROPE, embedding_multiplier=3.0, residual_multiplier=0.5,
                    attention_multiplier=0.2, logits_scaling=4.0),
    "olmo2": dict(model_type="olmo2", **_ROPE, pad_token_id=0, eos_token_id=2,
                  initializer_range=0.1),  # at 0.02 its post-norm-only items all exit alike after a prefix
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=6, num_attention_heads=4,
                vocab_size=128, max_position_embeddings=256, word_embed_proj_dim=64),
    "opt-postnorm": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=6, num_attention_heads=4,
                         vocab_size=128, max_position_embeddings=256, word_embed_proj_dim=32,
                         do_layer_norm_before=False),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=6, n_head=4, vocab_size=128, n_positions=256,
                 bos_token_id=0, eos_token_id=0),
}


def build_tiny(family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    from adainfer_ray.models import wrap_model

    cfg = dict(TINY_CONFIGS[family])
    torch.manual_seed(seed)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    return wrap_model(model, tokenizer=None, model_id=f"tiny-{family}", model_hash=family)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_lm(request):
    return build_tiny(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return build_tiny("llama")


def random_items(n: int, seed: int = 0, vocab: int = 128, lo: int = 3, hi: int = 20) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, rng.integers(lo, hi)).tolist() for _ in range(n)]


@pytest.fixture(scope="session")
def default_lm():
    """The real embedded default model (SmolLM2-135M-Instruct), converted once into the user cache."""
    from adainfer_ray.models import load_model

    torch.set_num_threads(2)
    return load_model(device="cpu")


def save_tiny_llama(folder, hidden: int, layers: int, heads: int):
    """A random Llama saved as a normal HF folder, with the default model's real tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from adainfer_ray.models import ensure_default_model

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=2, vocab_size=49152,
                                  max_position_embeddings=2048, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_default_model() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (4 layers, 64 wide) with the real tokenizer: the whole job runs on it in seconds."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden=64, layers=4, heads=4)


def review_texts(n: int, seed: int = 0) -> list[str]:
    """Short synthetic reviews of varied length (the tiny test policy is fitted on these)."""
    rng = np.random.default_rng(seed)
    words = ["great", "awful", "food", "film", "service", "slow", "lovely", "broken", "fine", "never", "again"]
    return [" ".join(rng.choice(words, rng.integers(2, 25))) for _ in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real two-node Ray cluster on localhost, started as the README says: `cluster/local.sh start
    --nodes 2`, then the exports of `cluster/local.sh env` (token auth on). Worker node 1 has the custom
    resource `node_1`. Yields {"address": GCS address, "dashboard": http url, "env": the exports,
    "local_sh": the command with its state folder}. `stop` stops only this cluster's processes."""
    import shlex
    import subprocess

    state = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    sh_env = {**os.environ, "ADAINFER_CLUSTER_STATE": state}
    port, dash = free_port(), free_port()  # free ports: other Rays may run on this machine

    def local_sh(*args):
        return subprocess.run(["bash", os.path.join(ROOT, "cluster", "local.sh"), *args], env=sh_env,
                              capture_output=True, text=True, timeout=300)

    r = local_sh("start", "--nodes", "2", "--port", str(port), "--dashboard-port", str(dash), "--num-cpus", "2")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        exports = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                       for line in local_sh("env").stdout.splitlines())
        os.environ.update({k: v for k, v in exports.items() if k != "RAY_ADDRESS"})  # as `eval` would
        info = {"address": f"127.0.0.1:{port}", "dashboard": exports["RAY_ADDRESS"], "env": exports,
                "local_sh": local_sh}
        import time
        import urllib.request

        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        probe = urllib.request.Request(info["dashboard"] + "/api/version", headers={"Authorization": f"Bearer {token}"})
        for _ in range(60):  # the job API comes up a little after `ray start` returns
            try:
                urllib.request.urlopen(probe, timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield info
    finally:
        import ray

        ray.shutdown()
        local_sh("stop")


# Prefixed to a submitted command: the job's Ray Data waits until every model actor is up before it
# hands out blocks. Without it, on a busy 2-core machine the first actor to load its model could take
# every block before the second was ready, and a test of spreading over two nodes would say nothing
# (it happened with 12 blocks).
ALL_ACTORS_UP = ("env", "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S=300")


def ray_job_submit(*command, address: str | None = None, env: dict | None = None, timeout: int = 900):
    """`ray job submit --working-dir <checkout> -- <command>` from the checkout, retried while a
    fresh head's job agent is still registering ("No available agent"). `address`: the dashboard
    (else RAY_ADDRESS from `env`, as after `eval "$(cluster/local.sh env)"`)."""
    import subprocess
    import time

    where = ["--address", address] if address else []
    for _ in range(30):
        r = subprocess.run(["ray", "job", "submit", *where, "--working-dir", ROOT, "--", *map(str, command)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in r.stderr:
            return r
        time.sleep(2)
    return r


@pytest.fixture(scope="session")
def ray_connected(ray_cluster):
    """This test process connected to the local test cluster (jobs run in-process use it)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray_cluster["address"]
    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], log_to_driver=False)
    return ray_cluster


@pytest.fixture(scope="session")
def tiny_policy_dir(tiny_model_dir, tmp_path_factory):
    """An early-exit policy for the tiny model and the sentiment task, fitted with the engine's own
    trace + ExitPolicy.fit, its threshold set so that about half the items stop early."""
    from adainfer_ray.engine import EarlyExitEngine
    from adainfer_ray.models import load_model
    from adainfer_ray.policy import ExitPolicy, exit_inputs
    from adainfer_ray.prompts import SENTIMENT, PromptEncoder

    lm = load_model(str(tiny_model_dir), device="cpu")
    enc = PromptEncoder(SENTIMENT, lm.tokenizer, lm.max_context)
    b = enc.encode(review_texts(80))
    tr = EarlyExitEngine(lm, enc.label_token_ids, prefix_ids=b.prefix_ids).trace(b.item_ids)
    top, gap, lab = tr["label_top"], tr["label_gap"], tr["label_label"]
    policy = ExitPolicy(features="label").fit(top, gap, lab == tr["final_label"][:, None])
    L = lm.num_layers
    d = policy.decision_function(exit_inputs(top, gap, np.arange(1, L + 1), L))[:, : L - 1]
    policy.threshold = float(np.quantile(d.max(1), 0.5)) + 1e-9
    policy.metadata = {"model_id": str(tiny_model_dir), "model_hash": lm.model_hash, "task": "sentiment",
                       "task_fingerprint": SENTIMENT.fingerprint()}
    return policy.save(tmp_path_factory.mktemp("policy") / "tiny-sentiment")
