#!/usr/bin/env bash
# A one-machine Ray cluster to submit jobs to, the same way as to a real cluster:
#
#   cluster/local.sh start [--port 6379] [--dashboard-port 8265] [--num-cpus N] [--num-gpus N]
#   export RAY_ADDRESS=http://127.0.0.1:8265
#   ray job submit --working-dir . -- python jobs/classify.py
#   cluster/local.sh status
#   cluster/local.sh stop
#
# Needs `ray[default]` (the dashboard serves the job submission API), not just `ray[data]`.
# Everything binds to 127.0.0.1 only. `stop` runs `ray stop`, which stops every Ray node that
# this user started on this machine, not only the one from `start`.
set -euo pipefail

PROG="cluster/local.sh"

usage() {
    cat >&2 <<USAGE
usage: $PROG start [--port P] [--dashboard-port D] [--num-cpus N] [--num-gpus N]
       $PROG status [--port P] [--dashboard-port D]
       $PROG stop

  start   start a local Ray head node (GCS on port P, default 6379) with the dashboard and
          job submission API on http://127.0.0.1:D (default 8265)
  status  show the cluster's resources and its jobs
  stop    stop the local Ray processes (ray stop)
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

port=6379
dashboard_port=8265
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
            --num-cpus) num_cpus="$val" ;;
            --num-gpus) num_gpus="$val" ;;
        esac
        shift 2
    done
}

cmd_start() {
    parse_opts --port --dashboard-port --num-cpus --num-gpus -- "$@"
    need_ray
    check_dashboard_deps
    local args=(--head --port "$port"
                --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port")
    [[ -n "$num_cpus" ]] && args+=(--num-cpus "$num_cpus")
    [[ -n "$num_gpus" ]] && args+=(--num-gpus "$num_gpus")
    ray start "${args[@]}"
    cat <<DONE

Local Ray cluster is up (GCS 127.0.0.1:$port). Submit jobs to it with:

  export RAY_ADDRESS=http://127.0.0.1:$dashboard_port
  ray job submit --working-dir . -- python jobs/classify.py

Dashboard: http://127.0.0.1:$dashboard_port    Stop it with: $PROG stop
DONE
}

cmd_status() {
    parse_opts --port --dashboard-port -- "$@"
    need_ray
    ray status --address "127.0.0.1:$port"
    echo
    echo "Jobs (RAY_ADDRESS=http://127.0.0.1:$dashboard_port):"
    ray list jobs --address "http://127.0.0.1:$dashboard_port"
}

cmd_stop() {
    [[ $# -eq 0 ]] || usage
    need_ray
    ray stop
}

[[ $# -ge 1 ]] || usage
sub="$1"
shift
case "$sub" in
    start) cmd_start "$@" ;;
    status) cmd_status "$@" ;;
    stop) cmd_stop "$@" ;;
    -h|--help|help) usage ;;
    *) echo "$PROG: unknown command: $sub" >&2; usage ;;
esac
