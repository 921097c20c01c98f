#!/usr/bin/env bash
# A Ray cluster of one or more nodes on this machine, to submit jobs to the same way as to a real
# cluster, with Ray's token authentication on (as Ray >= 2.5x starts clusters once a token exists):
#
#   cluster/local.sh start [--nodes 2]          # a head + 1 worker node, each a real raylet
#   eval "$(cluster/local.sh env)"              # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
#   ray job submit --working-dir . -- python jobs/classify.py --actors 2
#   cluster/local.sh status
#   cluster/local.sh stop                       # stops only what `start` started
#
# Needs `ray[default]` (the dashboard serves the job submission API), not just `ray[data]`.
# Everything binds to 127.0.0.1. The token is $RAY_AUTH_TOKEN_PATH if set, else ~/.ray/auth_token
# (the file any local `ray.init()`, e.g. the quick start, leaves); it is created if missing.
# The state (pids, Ray temp dirs, the env to print) lives in $ADAINFER_CLUSTER_STATE
# (default /tmp/adainfer-cluster-$UID): one local cluster per state folder.
set -euo pipefail

PROG="cluster/local.sh"
STATE="${ADAINFER_CLUSTER_STATE:-/tmp/adainfer-cluster-$(id -u)}"

usage() {
    cat >&2 <<USAGE
usage: $PROG start [--nodes N] [--port P] [--dashboard-port D] [--num-cpus N] [--num-gpus N]
       $PROG env
       $PROG status
       $PROG stop

  start   start a Ray head node (GCS on 127.0.0.1:P, default 6379; dashboard and job API on
          http://127.0.0.1:D, default 8265) and N-1 worker nodes (default N=1) on this machine,
          token authentication on. Worker node k gets the custom resource node_k (1 unit).
          --num-cpus/--num-gpus apply to each node.
  env     print the exports a shell needs: eval "\$($PROG env)"
  status  show the cluster's nodes, resources and jobs
  stop    stop the processes that start started (not other Ray clusters of this user)
State folder: \$ADAINFER_CLUSTER_STATE (now $STATE).
USAGE
    exit 2
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

need_ray() {
    command -v ray >/dev/null 2>&1 || die "'ray' is not on PATH; pip install 'ray[default]'"
}

# The Python that the `ray` command runs on: $PYTHON if set, else the interpreter in the
# script's #! line (seen through a pyenv shim), else python3.
ray_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    local script first
    script="$(command -v ray)"
    if [[ "$script" == */shims/ray ]] && command -v pyenv >/dev/null 2>&1; then
        script="$(pyenv which ray 2>/dev/null || echo "$script")"
    fi
    first="$(head -n 1 "$script" 2>/dev/null || true)"
    if [[ "$first" =~ ^\#\!(/[^[:space:]]*python[^[:space:]]*)$ ]]; then
        echo "${BASH_REMATCH[1]}"
    else
        echo python3
    fi
}

# The job submission API lives in the dashboard, which `ray[data]` alone does not install.
# Checked up front: a failed `ray start --include-dashboard true` leaves half a cluster behind.
check_dashboard_deps() {
    local py err
    py="$(ray_python)"
    "$py" -c 'import ray' >/dev/null 2>&1 || return 0  # not ray's Python after all; let ray say
    err="$("$py" - <<'PYCODE'
try:
    from ray._private.utils import get_dashboard_dependency_error
    e = get_dashboard_dependency_error()
except ImportError:
    try:
        import aiohttp  # noqa: F401
        e = None
    except ImportError as exc:
        e = exc
print(e or "", end="")
PYCODE
)"
    if [[ -n "$err" ]]; then
        die "the Ray dashboard cannot start ($err); pip install 'ray[default]'"
    fi
}

is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }

# N free TCP ports on 127.0.0.1, one per line: the nodes of one machine must not share any port.
free_ports() {
    "$(ray_python)" - "$1" <<'PYCODE'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print("\n".join(str(s.getsockname()[1]) for s in socks))
PYCODE
}

port=6379
dashboard_port=8265
nodes=1
num_cpus=""
num_gpus=""

# parse_opts ALLOWED... -- ARGS...: sets the globals above; anything else is a usage error.
parse_opts() {
    local allowed=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do allowed+=("$1"); shift; done
    shift || true
    while [[ $# -gt 0 ]]; do
        local opt="$1" val
        case " ${allowed[*]} " in *" $opt "*) ;; *) echo "$PROG: unknown option: $opt" >&2; usage ;; esac
        [[ $# -ge 2 ]] || { echo "$PROG: $opt needs a value" >&2; usage; }
        val="$2"
        is_count "$val" || { echo "$PROG: $opt needs a whole number, got '$val'" >&2; usage; }
        case "$opt" in
            --port) port="$val" ;;
            --dashboard-port) dashboard_port="$val" ;;
            --nodes) nodes="$val" ;;
            --num-cpus) num_cpus="$val" ;;
            --num-gpus) num_gpus="$val" ;;
        esac
        shift 2
    done
    [[ "$nodes" -ge 1 ]] || { echo "$PROG: --nodes must be at least 1" >&2; usage; }
}

# The token every node checks and every client presents. Ray reads RAY_AUTH_TOKEN, then the file
# RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token; a missing file is created like `ray get-auth-token
# --generate` does (256 random bits, hex), but at RAY_AUTH_TOKEN_PATH when that is set.
token_path() { echo "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"; }

ensure_token() {
    [[ -n "${RAY_AUTH_TOKEN:-}" ]] && return 0
    local path
    path="$(token_path)"
    if [[ ! -s "$path" ]]; then
        mkdir -p "$(dirname "$path")"
        (umask 077 && "$(ray_python)" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$path")
        echo "$PROG: created the cluster's authentication token in $path" >&2
    fi
}

# The pids of the processes of this cluster: every Ray process but one names its node's temp dir,
# which lives inside $STATE and belongs to no other cluster; the Ray Client server names the GCS
# address instead, whose port is this cluster's alone on this machine.
cluster_pids() {
    pgrep -f -- "$STATE/ray/" || true
    if [[ -f "$STATE/gcs_port" ]]; then
        pgrep -f -- "ray\.util\.client\.server --address=[^ ]*:$(cat "$STATE/gcs_port") " || true
    fi
}

# start_node K ARGS...: `ray start ARGS`, tried twice. Ray gives a raylet 30 s to register with the
# GCS, which a loaded machine can miss; the failed node's processes are stopped before the retry.
start_node() {
    local k="$1" try pid
    shift
    for try in 1 2; do
        ray start "$@" > "$STATE/start-n$k.log" 2>&1 && return 0
        for pid in $(pgrep -f -- "$STATE/ray/n$k/" || true); do kill -KILL "$pid" 2>/dev/null || true; done
        rm -rf "$STATE/ray/n$k"
        [[ $try -eq 1 ]] && echo "$PROG: node $k did not start in time; trying once more" >&2
    done
    return 1
}

cmd_start() {
    parse_opts --nodes --port --dashboard-port --num-cpus --num-gpus -- "$@"
    need_ray
    check_dashboard_deps
    if [[ -f "$STATE/env" ]] && [[ -n "$(cluster_pids)" ]]; then
        die "a cluster from $STATE is already running ($PROG status; $PROG stop)"
    fi
    rm -rf "$STATE"
    mkdir -p "$STATE/ray"
    echo "$port" > "$STATE/gcs_port"
    ensure_token
    # Token auth on explicitly: without a token file Ray would start the cluster open.
    export RAY_AUTH_MODE=token
    local common=(--disable-usage-stats --node-ip-address 127.0.0.1)
    [[ -n "$num_cpus" ]] && common+=(--num-cpus "$num_cpus")
    [[ -n "$num_gpus" ]] && common+=(--num-gpus "$num_gpus")
    local k p
    for ((k = 0; k < nodes; k++)); do
        # Each node: its own temp dir and its own ports for every per-node service.
        mapfile -t p < <(free_ports 6)
        local args=(--node-manager-port "${p[0]}" --object-manager-port "${p[1]}"
                    --dashboard-agent-listen-port "${p[2]}" --dashboard-agent-grpc-port "${p[3]}"
                    --metrics-export-port "${p[4]}" --runtime-env-agent-port "${p[5]}"
                    --temp-dir "$STATE/ray/n$k")
        if [[ $k -eq 0 ]]; then
            args+=(--head --port "$port" --include-dashboard true --dashboard-host 127.0.0.1
                   --dashboard-port "$dashboard_port" --ray-client-server-port "$(free_ports 1)")
        else
            args+=(--address "127.0.0.1:$port" --resources "{\"node_$k\": 1}")
        fi
        if ! start_node "$k" "${common[@]}" "${args[@]}"; then
            cat "$STATE/start-n$k.log" >&2
            cluster_pids > "$STATE/pids"
            die "node $k did not start (log above); clean up with: $PROG stop"
        fi
    done
    cluster_pids > "$STATE/pids"
    {
        echo "export RAY_ADDRESS=http://127.0.0.1:$dashboard_port"
        echo "export RAY_AUTH_MODE=token"
        if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
            echo "export RAY_AUTH_TOKEN_PATH=$(realpath "$(token_path)")"
        fi
    } > "$STATE/env"
    cat <<DONE
Local Ray cluster is up: $nodes node(s), GCS 127.0.0.1:$port, token authentication on.
Submit jobs to it with:

  eval "\$($PROG env)"
  ray job submit --working-dir . -- python jobs/classify.py

Dashboard: http://127.0.0.1:$dashboard_port (it asks for the token: $PROG env names its file)
Stop it with: $PROG stop
DONE
}

need_state() {
    [[ -f "$STATE/env" ]] || die "no cluster started from $STATE: run $PROG start first"
}

cmd_env() {
    [[ $# -eq 0 ]] || usage
    need_state
    cat "$STATE/env"
}

cmd_status() {
    [[ $# -eq 0 ]] || usage
    need_ray
    need_state
    # shellcheck disable=SC1091
    source "$STATE/env"
    ray status --address "127.0.0.1:$(cat "$STATE/gcs_port")"
    echo
    echo "Jobs ($RAY_ADDRESS):"
    ray job list --address "$RAY_ADDRESS"
}

cmd_stop() {
    [[ $# -eq 0 ]] || usage
    [[ -d "$STATE" ]] || { echo "$PROG: nothing to stop ($STATE does not exist)"; return 0; }
    local pid
    # The processes that name this cluster's temp dirs: the recorded ones ($STATE/pids) and the
    # workers started since (model actors). A recorded pid that no longer names them is reused.
    for pid in $(cluster_pids); do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 20); do
        [[ -z "$(cluster_pids)" ]] && break
        sleep 0.5
    done
    for pid in $(cluster_pids); do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$STATE"
    echo "$PROG: stopped the local cluster"
}

[[ $# -ge 1 ]] || usage
sub="$1"
shift
case "$sub" in
    start) cmd_start "$@" ;;
    env) cmd_env "$@" ;;
    status) cmd_status "$@" ;;
    stop) cmd_stop "$@" ;;
    -h|--help|help) usage ;;
    *) echo "$PROG: unknown command: $sub" >&2; usage ;;
esac
