"""The documented cluster path, run as a user runs it (issue 12): `cluster/local.sh start --nodes 2`,
`eval "$(cluster/local.sh env)"` (token authentication on), `ray job submit ... -- python
jobs/classify.py --actors 2`. The session's ray_cluster fixture (tests/conftest.py) is that cluster.
"""

import glob
import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adainfer_ray.schema import OUTPUT_SCHEMA, SIDECAR_NAME
from conftest import ALL_ACTORS_UP, free_port, ray_job_submit, review_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def write_inputs(folder, n_files=4, rows=50):
    """Files of the same name in different folders: their derived ids must not collide."""
    texts = review_texts(n_files * rows, seed=3)
    for k in range(n_files):
        sub = folder / f"shard{k % 2}" / f"day{k // 2}"
        sub.mkdir(parents=True, exist_ok=True)
        with open(sub / "part-0.jsonl", "w") as f:
            for t in texts[k * rows:(k + 1) * rows]:
                f.write(json.dumps({"text": t}) + "\n")
    return n_files * rows


def submit(ray_cluster, *job_args, env=None, job="jobs/classify.py"):
    """`ray job submit` with the exports of `cluster/local.sh env`, as the README says."""
    return ray_job_submit(*ALL_ACTORS_UP, "python", job, *job_args,
                          env={**os.environ, **ray_cluster["env"], **(env or {})})


def cluster_node_ids(ray_cluster) -> set[str]:
    r = subprocess.run(["ray", "list", "nodes", "--format", "json", "--address", ray_cluster["dashboard"]],
                       env={**os.environ, **ray_cluster["env"]}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return {n["node_id"] for n in json.loads(r.stdout) if n["state"] == "ALIVE"}


def read_output(folder) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(os.path.join(folder, "*.parquet")))])


def test_without_the_token_the_cluster_refuses(ray_cluster):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run(["ray", "job", "list", "--address", ray_cluster["dashboard"]], env={**env, "HOME": "/nonexistent"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "authentication" in (r.stdout + r.stderr).lower()
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    ok = urllib.request.Request(ray_cluster["dashboard"] + "/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(ok, timeout=10).status == 200
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(ray_cluster["dashboard"] + "/api/jobs/", timeout=10)
    assert e.value.code == 401


def test_two_actors_on_two_nodes_calibrate_and_label_every_row_once(ray_cluster, tiny_model_dir, tmp_path):
    """classify --calibrate and jobs/calibrate.py with --actors 2: the trace and label actors spread
    over both nodes, every row is written once (files of the same name in different folders too),
    and nothing the actors need (task, policy, demos) is read from a path on the driver's machine."""
    n = write_inputs(tmp_path / "in", rows=100)
    demos = tmp_path / "driver-only" / "demos.jsonl"
    demos.parent.mkdir()
    demos.write_text(json.dumps({"text": "great", "label": "positive"}) + "\n" +
                     json.dumps({"text": "awful", "label": "negative"}) + "\n")
    common = ["--input", tmp_path / "in", "--model", tiny_model_dir, "--actors", "2", "--batch-size", "10",
              "--demos", demos, "--epsilon", "0.3", "--delta", "0.3"]
    out = tmp_path / "out"
    r = submit(ray_cluster, *common, "--calibrate", "120", "--output", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert table.schema == OUTPUT_SCHEMA and len(ids) == n and len(set(ids)) == n
    assert {i.rsplit(":", 1)[0] for i in ids} == {f"shard{k % 2}/day{k // 2}/part-0.jsonl" for k in range(4)}
    assert table.column("error").null_count == n and sum(table.column("calibration").to_pylist()) == 120
    side = json.loads((out / SIDECAR_NAME).read_text())
    assert set(side["actor_nodes"]) == cluster_node_ids(ray_cluster), r.stdout[-4000:]  # both nodes ran a model actor
    assert side["runs"][-1]["actor_nodes"] == side["actor_nodes"] and side["rows"] == n
    r = submit(ray_cluster, *common, "--sample", "120", "--output", tmp_path / "policy", job="jobs/calibrate.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    meta = json.loads((tmp_path / "policy" / "policy.json").read_text())["metadata"]
    assert meta["calibration_size"] == 120 and set(meta["actor_nodes"]) == cluster_node_ids(ray_cluster)


def test_the_default_model_runs_on_both_nodes(ray_cluster, tmp_path):
    out = tmp_path / "out"
    r = submit(ray_cluster, "--output", out, "--actors", "2", "--limit", "40", "--batch-size", "10")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    table = read_output(out)
    assert table.num_rows == 40 and len(set(table.column("id").to_pylist())) == 40
    assert set(table.column("label").to_pylist()) <= {"negative", "positive"}
    assert len(set(json.loads((out / SIDECAR_NAME).read_text())["actor_nodes"])) == 2


def test_stop_stops_only_its_own_cluster(ray_cluster):
    state = tempfile.mkdtemp(prefix="rc2-", dir="/tmp")
    env = {**os.environ, "ADAINFER_CLUSTER_STATE": state}
    sh = os.path.join(ROOT, "cluster", "local.sh")
    r = subprocess.run(["bash", sh, "start", "--port", str(free_port()), "--dashboard-port", str(free_port()),
                        "--num-cpus", "1"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "RAY_AUTH_MODE=token" in subprocess.run(["bash", sh, "env"], env=env, capture_output=True,
                                                       text=True).stdout
    finally:
        stop = subprocess.run(["bash", sh, "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and not os.path.exists(state)
    assert subprocess.run(["pgrep", "-f", state], capture_output=True).returncode == 1  # none of its processes left
    assert len(cluster_node_ids(ray_cluster)) == 2  # the session's cluster still runs
    status = ray_cluster["local_sh"]("status")
    assert status.returncode == 0 and "node_1" in status.stdout, status.stderr


def test_a_worker_node_lost_mid_run_costs_only_time(tiny_model_dir, tmp_path):
    """Issue 19: every process of the worker node (raylet, model actor, workers) SIGKILLed once the
    job has written a few files. The run-state actor lives on the driver's node (the head), so the
    job goes on there, runs the lost node's blocks again, and SUCCEEDS: each id once, no error rows."""
    import shlex
    import time

    state = tempfile.mkdtemp(prefix="rc3-", dir="/tmp")
    env = {**os.environ, "ADAINFER_CLUSTER_STATE": state}
    sh = os.path.join(ROOT, "cluster", "local.sh")
    r = subprocess.run(["bash", sh, "start", "--nodes", "2", "--port", str(free_port()), "--dashboard-port",
                        str(free_port()), "--num-cpus", "2"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        exports = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                       for line in subprocess.run(["bash", sh, "env"], env=env, capture_output=True,
                                                  text=True).stdout.splitlines())
        n = write_inputs(tmp_path / "in", n_files=12, rows=100)
        out = tmp_path / "out"
        cmd = ["ray", "job", "submit", "--working-dir", ROOT, "--", "env", "ADAINFER_DRILL_SLEEP_S=0.5",
               "python", "jobs/classify.py", "--input", str(tmp_path / "in"), "--output", str(out), "--model",
               str(tiny_model_dir), "--policy", "full", "--actors", "2", "--batch-size", "20",
               "--audit-fraction", "0"]
        job = subprocess.Popen(cmd, cwd=ROOT, env={**env, **exports}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while len(glob.glob(str(out / "*.parquet"))) < 3 and time.time() < deadline and job.poll() is None:
            time.sleep(0.5)
        worker = subprocess.run(["pgrep", "-f", "--", f"{state}/ray/n1/"], capture_output=True, text=True).stdout.split()
        assert worker and job.poll() is None, "the job ended before the node could be killed"
        for pid in worker:  # the whole worker node, at once: raylet, its workers, the model actor there
            subprocess.run(["kill", "-KILL", pid])
        written_before = len(glob.glob(str(out / "*.parquet")))
        log, _ = job.communicate(timeout=600)
    finally:
        subprocess.run(["bash", sh, "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, log[-5000:]
    assert "succeeded" in log, log[-3000:]
    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n
    assert table.column("error").null_count == n  # the loss made no error rows
    side = json.loads((out / SIDECAR_NAME).read_text())
    assert len(side["actor_nodes"]) == 2, side["actor_nodes"]  # the lost node had done work
    assert written_before < len(glob.glob(str(out / "*.parquet")))  # and the run went on after the loss
