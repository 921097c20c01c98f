"""The files under cluster/ parse, carry the fields Ray and KubeRay need, and match this checkout.

Nothing here needs a Kubernetes cluster, a cloud account or a GPU: the manifests are read as data,
the launcher config goes through Ray's own schema validation, the RayJob's runtime env through
Ray's own RuntimeEnv, and cluster/local.sh is only syntax-checked and run with bad arguments or no
cluster (it starts nothing then; tests/test_cluster.py starts real ones).
"""

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher"
LOCAL_SH = CLUSTER / "local.sh"
CLASSIFY = ROOT / "jobs" / "classify.py"

# The flags of jobs/classify.py that the manifests may use. When the job exists, its real --help
# is checked too (test_rayjob_flags_are_accepted_by_classify_help).
CLASSIFY_FLAGS = {
    "--input", "--output", "--text-column", "--id-column", "--task", "--policy",
    "--actors", "--gpus-per-actor", "--batch-size",
}
PROJECT = "adainfer-ray"
GPU = "nvidia.com/gpu"
RAY_MAJOR_MINOR = tuple(int(x) for x in ray.__version__.split(".")[:2])


# ---------------------------------------------------------------- helpers

def yaml_files():
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def docs_of_kind(kind):
    """(path, doc) for every Kubernetes document of this kind under cluster/."""
    return [(p, d) for p in yaml_files() for d in load_docs(p)
            if isinstance(d, dict) and d.get("kind") == kind]


def launcher_configs():
    return [(p, d) for p in sorted(LAUNCHER.glob("*.y*ml")) for d in load_docs(p)]


def dist_name(requirement):
    """'adainfer-ray @ https://...' / 'torch>=2.2' / 'ray[data]>=2.40' -> normalised name."""
    name = re.split(r"[\s\[<>=!~;@(]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_dependency_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {dist_name(d) for d in project["dependencies"]}


def image_ray_version(image, where):
    """The (major, minor) of a pinned rayproject/ray image; fails on unpinned or foreign images."""
    m = re.fullmatch(r"(?:docker\.io/)?rayproject/ray(?:-ml)?:(\d+)\.(\d+)\.(\d+)(-[\w.-]+)?", image)
    assert m, f"{where}: image {image!r} is not a pinned rayproject/ray:X.Y.Z[-variant] image"
    return int(m.group(1)), int(m.group(2))


def assert_image_matches_ray(image, where):
    version = image_ray_version(image, where)
    assert version == RAY_MAJOR_MINOR, (
        f"{where}: image {image!r} runs Ray {version[0]}.{version[1]} but this checkout has "
        f"ray {ray.__version__}; update the image tag (and rayVersion) in cluster/")


def is_gpu_image(image):
    tag = image.rsplit(":", 1)[-1]
    return bool(re.search(r"-(gpu|cu\d+)\b", tag))


def quantity(value):
    return float(str(value))


def gpu_limit(container):
    limits = (container.get("resources") or {}).get("limits") or {}
    return quantity(limits.get(GPU, 0))


def string_map(params, where):
    assert isinstance(params, dict), f"{where}: rayStartParams must be a mapping"
    for k, v in params.items():
        # KubeRay declares rayStartParams as map[string]string: an unquoted 0 or true is rejected.
        assert isinstance(k, str) and isinstance(v, str), (
            f"{where}: rayStartParams[{k!r}] = {v!r} must be a quoted string")


def check_pod_template(template, where):
    containers = template["spec"]["containers"]
    assert isinstance(containers, list) and containers, f"{where}: no containers"
    c = containers[0]
    assert c.get("image"), f"{where}: containers[0] has no image"
    assert_image_matches_ray(c["image"], where)
    res = c.get("resources") or {}
    requests, limits = res.get("requests") or {}, res.get("limits") or {}
    for key in ("cpu", "memory"):
        assert key in requests or key in limits, f"{where}: containers[0] sets no {key} resources"
    if GPU in requests or GPU in limits:
        # Kubernetes: extended resources go in limits, and requests (if given) must equal them.
        assert GPU in limits, f"{where}: {GPU} must be set in limits"
        if GPU in requests:
            assert quantity(requests[GPU]) == quantity(limits[GPU]), (
                f"{where}: {GPU} requests and limits differ")
    return c


def check_cluster_spec(spec, where):
    """The RayClusterSpec checks shared by RayCluster.spec and RayJob.spec.rayClusterSpec."""
    head = spec["headGroupSpec"]
    string_map(head["rayStartParams"], f"{where} head")
    check_pod_template(head["template"], f"{where} head")

    if "rayVersion" in spec:
        rv = tuple(int(x) for x in str(spec["rayVersion"]).split(".")[:2])
        assert rv == RAY_MAJOR_MINOR, f"{where}: rayVersion {spec['rayVersion']} != ray {ray.__version__}"
    # Token authentication on, as Ray runs clusters: the operator makes the Secret and hands it out.
    assert spec.get("authOptions") == {"mode": "token"}, f"{where}: no authOptions: {{mode: token}}"

    groups = spec.get("workerGroupSpecs")
    assert isinstance(groups, list) and groups, f"{where}: no workerGroupSpecs"
    names = [g.get("groupName") for g in groups]
    assert all(names), f"{where}: every worker group needs a groupName"
    assert len(set(names)) == len(names), f"{where}: duplicate groupName in {names}"

    gpu_groups = []
    for g in groups:
        w = f"{where} group {g['groupName']}"
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g.get(key), int), f"{w}: {key} must be an integer"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (
            f"{w}: need minReplicas <= replicas <= maxReplicas, got "
            f"{g['minReplicas']}, {g['replicas']}, {g['maxReplicas']}")
        assert g["maxReplicas"] >= 1, f"{w}: maxReplicas 0 never runs anything"
        string_map(g.get("rayStartParams", {}), w)
        c = check_pod_template(g["template"], w)
        if gpu_limit(c) >= 1:
            assert is_gpu_image(c["image"]), f"{w}: GPU group runs a CPU image {c['image']!r}"
            gpu_groups.append(g)
    assert gpu_groups, f"{where}: no worker group has {GPU} >= 1 in its limits"
    return gpu_groups


def gpu_container_shape(spec):
    """What the GPU workers look like: (image, requests, limits) per GPU group, by name."""
    out = {}
    for g in spec["workerGroupSpecs"]:
        c = g["template"]["spec"]["containers"][0]
        if gpu_limit(c) >= 1:
            out[g["groupName"]] = (c["image"], c["resources"].get("requests"), c["resources"]["limits"])
    return out


def entrypoint_tokens(job):
    return shlex.split(job["spec"]["entrypoint"])


def entrypoint_flags(tokens):
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--")]


# ---------------------------------------------------------------- every YAML file

def test_cluster_dir_has_the_expected_files():
    for rel in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "launcher/aws.yaml",
                "local.sh", "README.md"):
        assert (CLUSTER / rel).is_file(), f"cluster/{rel} is missing"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses_to_mappings(path):
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is a {type(d).__name__}, not a mapping"
        if "apiVersion" in d or "kind" in d:
            assert d.get("apiVersion") == "ray.io/v1", f"{path}: apiVersion {d.get('apiVersion')!r}"
            assert d.get("kind") in ("RayCluster", "RayJob"), f"{path}: unexpected kind {d.get('kind')!r}"
            assert (d.get("metadata") or {}).get("name"), f"{path}: {d['kind']} without metadata.name"
            assert isinstance(d.get("spec"), dict), f"{path}: {d['kind']} without spec"


def test_readme_mentions_every_cluster_file():
    readme = (CLUSTER / "README.md").read_text()
    for p in yaml_files() + [LOCAL_SH]:
        rel = str(p.relative_to(CLUSTER))
        assert rel in readme, f"cluster/README.md does not mention {rel}"


# ---------------------------------------------------------------- KubeRay RayCluster

def test_raycluster_has_head_and_gpu_workers():
    clusters = docs_of_kind("RayCluster")
    assert clusters, "no RayCluster manifest under cluster/"
    for path, doc in clusters:
        spec = doc["spec"]
        check_cluster_spec(spec, f"{path.name}")
        params = spec["headGroupSpec"]["rayStartParams"]
        # The job submission API is served by the dashboard; it must listen beyond the pod.
        assert params.get("dashboard-host") == "0.0.0.0", f"{path.name}: head dashboard-host"


# ---------------------------------------------------------------- KubeRay RayJob

def rayjobs():
    jobs = docs_of_kind("RayJob")
    assert jobs, "no RayJob manifest under cluster/"
    return jobs


def test_rayjob_entrypoint_runs_classify_with_known_flags():
    for path, job in rayjobs():
        tokens = entrypoint_tokens(job)
        assert tokens[:2] == ["python", "jobs/classify.py"], (
            f"{path.name}: entrypoint must start with 'python jobs/classify.py', got {tokens[:2]}")
        flags = entrypoint_flags(tokens)
        unknown = sorted(set(flags) - CLASSIFY_FLAGS)
        assert not unknown, f"{path.name}: entrypoint flags not in jobs/classify.py: {unknown}"
        assert len(flags) == len(set(flags)), f"{path.name}: a flag is given twice: {flags}"
        # A cluster run must write somewhere that outlives the cluster.
        assert "--output" in flags, f"{path.name}: entrypoint has no --output"
        out = tokens[tokens.index("--output") + 1]
        assert re.match(r"^[a-z][a-z0-9+]*://", out), (
            f"{path.name}: --output {out!r} is a pod-local path; the cluster is deleted afterwards")


def test_rayjob_flags_are_accepted_by_classify_help():
    proc = subprocess.run([sys.executable, str(CLASSIFY), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"classify.py --help failed:\n{proc.stderr[-2000:]}"
    help_text = proc.stdout
    for path, job in rayjobs():
        for flag in entrypoint_flags(entrypoint_tokens(job)):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
                f"{path.name}: jobs/classify.py --help does not list {flag}")
    for flag in sorted(CLASSIFY_FLAGS):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
            f"jobs/classify.py --help does not list {flag}; update CLASSIFY_FLAGS and cluster/")


def test_rayjob_runtime_env_is_valid_and_installs_the_project():
    from ray.runtime_env import RuntimeEnv

    deps = pyproject_dependency_names() - {"ray"}  # the image provides Ray itself
    for path, job in rayjobs():
        text = job["spec"].get("runtimeEnvYAML")
        assert isinstance(text, str), f"{path.name}: spec.runtimeEnvYAML must be a YAML string"
        env = yaml.safe_load(text)
        assert isinstance(env, dict), f"{path.name}: runtimeEnvYAML is not a mapping"
        assert env.get("working_dir"), f"{path.name}: runtime env has no working_dir"
        # Ray's own validation: working_dir URI form, pip list shape, env_vars all strings.
        RuntimeEnv(**env)
        pip = env.get("pip") or []
        if isinstance(pip, dict):
            pip = pip.get("packages", [])
        names = {dist_name(p) for p in pip}
        assert PROJECT in names or deps <= names, (
            f"{path.name}: runtime env pip installs neither {PROJECT} nor all of its "
            f"dependencies (missing {sorted(deps - names)})")
        assert "ray" not in names, f"{path.name}: pip must not reinstall ray over the image's"


def test_rayjob_lifecycle_and_embedded_cluster():
    for path, job in rayjobs():
        spec = job["spec"]
        assert spec.get("shutdownAfterJobFinishes") is True, (
            f"{path.name}: shutdownAfterJobFinishes must be true (GPU clusters cost money)")
        ttl = spec.get("ttlSecondsAfterFinished")
        assert isinstance(ttl, int) and ttl >= 0, f"{path.name}: ttlSecondsAfterFinished {ttl!r}"
        assert "clusterSelector" not in spec, f"{path.name}: embeds its cluster; no clusterSelector"
        assert isinstance(spec.get("rayClusterSpec"), dict), f"{path.name}: no rayClusterSpec"
        check_cluster_spec(spec["rayClusterSpec"], f"{path.name} rayClusterSpec")


def test_rayjob_cluster_matches_raycluster():
    """The two KubeRay manifests describe the same machines (same images, same GPU workers)."""
    (_, cluster), = docs_of_kind("RayCluster")
    for path, job in rayjobs():
        embedded = job["spec"]["rayClusterSpec"]
        assert gpu_container_shape(embedded) == gpu_container_shape(cluster["spec"]), (
            f"{path.name}: GPU worker groups differ from raycluster.yaml")
        head = lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]  # noqa: E731
        assert head(embedded)["image"] == head(cluster["spec"])["image"], (
            f"{path.name}: head image differs from raycluster.yaml")
        assert embedded["headGroupSpec"]["rayStartParams"] == cluster["spec"]["headGroupSpec"]["rayStartParams"]


# ---------------------------------------------------------------- cluster launcher

def test_launcher_configs_exist():
    assert launcher_configs(), "no cluster launcher config under cluster/launcher/"


@pytest.mark.parametrize("path", sorted(LAUNCHER.glob("*.y*ml")), ids=lambda p: p.name)
def test_launcher_config_fields(path):
    (cfg,) = load_docs(path)
    assert cfg.get("cluster_name"), "cluster_name"
    assert (cfg.get("provider") or {}).get("type"), "provider.type"
    types = cfg.get("available_node_types")
    assert isinstance(types, dict) and types, "available_node_types"
    assert cfg.get("head_node_type") in types, (
        f"head_node_type {cfg.get('head_node_type')!r} is not one of {sorted(types)}")

    max_workers = cfg.get("max_workers")
    assert isinstance(max_workers, int), "max_workers"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    for name, t in workers.items():
        assert isinstance(t.get("max_workers"), int), f"{name}: max_workers"
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= max_workers, (
            f"{name}: need min_workers <= max_workers <= cluster max_workers ({max_workers})")
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= max_workers
    gpu_types = [n for n, t in workers.items() if (t.get("resources") or {}).get("GPU", 0) >= 1]
    assert gpu_types, "no worker node type declares resources GPU >= 1"

    docker = cfg.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if docker.get(key):
            assert_image_matches_ray(docker[key], f"{path.name} docker.{key}")
    if docker.get("image") or docker.get("worker_image"):
        assert is_gpu_image(docker.get("worker_image") or docker["image"]), "GPU workers need a GPU image"


@pytest.mark.parametrize("path", sorted(LAUNCHER.glob("*.y*ml")), ids=lambda p: p.name)
def test_launcher_setup_installs_the_project(path):
    (cfg,) = load_docs(path)
    commands = list(cfg.get("setup_commands") or [])
    assert commands, "setup_commands is empty: nodes would lack the project and its model"
    mounts = {os.path.normpath(os.path.expanduser(str(r))): l for r, l in (cfg.get("file_mounts") or {}).items()}
    installs = []
    for cmd in commands:
        for m in re.finditer(r"pip3? install\s+(.*)", cmd):
            for arg in shlex.split(m.group(1)):
                if arg.startswith("-"):  # -e, -U, --no-deps ...
                    continue
                installs.append(arg)
    project_sources = []
    for arg in installs:
        if arg.startswith(("/", "~")):
            # A directory on the node: it must be this repository, synced there by file_mounts
            # (whose local side is relative to the repository root, where `ray up` is run).
            remote = os.path.normpath(os.path.expanduser(arg))
            assert remote in mounts, f"setup_commands install {arg}, which no file_mounts entry provides"
            local = (ROOT / os.path.expanduser(str(mounts[remote]))).resolve()
            assert local == ROOT, f"file_mounts maps {arg} to {local}, not the repository root"
            project_sources.append(arg)
        elif dist_name(arg) == PROJECT or re.search(r"/adainfer[-_]ray(\.git)?(@|$)", arg):
            project_sources.append(arg)  # "adainfer-ray @ git+https://...", "git+https://.../adainfer-ray@main"
    assert project_sources, f"no setup command pip-installs {PROJECT}: {commands}"


@pytest.mark.parametrize("path", sorted(LAUNCHER.glob("*.y*ml")), ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path):
    """What `ray up` itself checks first: defaults filled in, then Ray's JSON schema."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # a private module; if Ray moves it, the checks above still stand
        pytest.skip("ray.autoscaler._private.util moved")
    (cfg,) = load_docs(path)
    validate_config(prepare_config(cfg))


@pytest.mark.parametrize("path", sorted(LAUNCHER.glob("*.y*ml")), ids=lambda p: p.name)
def test_launcher_nodes_start_with_token_auth_and_get_the_token(path):
    (cfg,) = load_docs(path)
    assert cfg["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), f"{path.name}: {key}"


# ---------------------------------------------------------------- cluster/local.sh

def run_local(*args):
    return subprocess.run(["bash", str(LOCAL_SH), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_local_sh_syntax_and_mode():
    proc = subprocess.run(["bash", "-n", str(LOCAL_SH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(LOCAL_SH, os.X_OK), "cluster/local.sh is not executable"
    text = LOCAL_SH.read_text()
    assert text.startswith("#!"), "no #! line"
    assert "set -euo pipefail" in text


@pytest.mark.parametrize("args", [(), ("frobnicate",), ("start", "--port", "not-a-port"),
                                  ("start", "--nope", "1"), ("start", "--port"), ("stop", "extra"),
                                  ("start", "--nodes", "0"), ("env", "extra")],
                         ids=["no-args", "bad-command", "bad-port", "bad-option", "missing-value",
                              "stop-extra", "no-nodes", "env-extra"])
def test_local_sh_rejects_bad_arguments_with_usage(args):
    # All of these fail in argument parsing, before `ray` is ever called.
    proc = run_local(*args)
    assert proc.returncode != 0
    assert "usage:" in proc.stderr.lower()
    for sub in ("start", "stop", "status"):
        assert sub in proc.stderr


def test_local_sh_env_and_stop_without_a_cluster(tmp_path):
    env = {**os.environ, "ADAINFER_CLUSTER_STATE": str(tmp_path / "state")}
    r = subprocess.run(["bash", str(LOCAL_SH), "env"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "run cluster/local.sh start first" in r.stderr and not r.stdout
    r = subprocess.run(["bash", str(LOCAL_SH), "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "nothing to stop" in r.stdout
