#!/usr/bin/env bash
# A two-node Ray cluster on 127.0.0.1: a head that offers no CPUs for work (as on a real cluster) and one
# worker with logical GPUs, token auth on, Prometheus metrics on fixed ports.
#
#   cluster/local.sh start    # then: facesynth submit --address http://127.0.0.1:8265 render ...
#   cluster/local.sh stop     # stops only the processes this script started (not other Ray instances)
#
# Settings (environment): FACESYNTH_RAY_DIR (Ray's --temp-dir and the pid files, default /tmp/facesynth-ray),
# RAY_PORT (6379), DASHBOARD_PORT (8265), CLIENT_PORT (10001), HEAD_METRICS_PORT (8080),
# WORKER_METRICS_PORT (8081), HEAD_AGENT_PORT (52365), WORKER_AGENT_PORT (52366), WORKER_CPUS (all),
# WORKER_GPUS (2, logical: scheduling only), RAY_START_ARGS (more `ray start` flags for both nodes, e.g.
# --object-store-memory=500000000), STOP_GRACE_S (10: seconds `stop` waits after SIGTERM before SIGKILL).
# The token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token (generated there when none exists).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$ROOT/.venv/bin/ray" ]]; then
    export PATH="$ROOT/.venv/bin:$PATH"  # `python -m jobs.NAME` entrypoints run the venv's python
fi
DIR="${FACESYNTH_RAY_DIR:-/tmp/facesynth-ray}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
CLIENT_PORT="${CLIENT_PORT:-10001}"
HEAD_METRICS_PORT="${HEAD_METRICS_PORT:-8080}"
WORKER_METRICS_PORT="${WORKER_METRICS_PORT:-8081}"
HEAD_AGENT_PORT="${HEAD_AGENT_PORT:-52365}"
WORKER_AGENT_PORT="${WORKER_AGENT_PORT:-52366}"
WORKER_CPUS="${WORKER_CPUS:-$(nproc)}"
WORKER_GPUS="${WORKER_GPUS:-2}"
STOP_GRACE_S="${STOP_GRACE_S:-10}"
export RAY_AUTH_MODE=token

# Runs `ray start` in a session of its own and records the session id: Ray's processes stay in it (workers get
# process groups of their own, not sessions), so `stop` signals exactly what this script started, plus the job
# drivers they spawned (`ray stop` would stop every Ray on the machine).
start_node() {
    local name="$1"
    shift
    # shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags
    setsid ray start --node-ip-address 127.0.0.1 --temp-dir "$DIR" --disable-usage-stats "$@" ${RAY_START_ARGS:-} \
        >"$DIR/$name.log" 2>&1 &
    local pid=$!
    echo "$pid" >"$DIR/$name.sid"
    if ! wait "$pid"; then
        echo "ray start ($name) failed:" >&2
        tail -n 30 "$DIR/$name.log" >&2
        stop
        exit 1
    fi
}

# The processes in the given sessions and all their descendants.
session_pids() {
    ps -eo pid=,ppid=,sid= | awk -v sids=" $* " '
        { pid[NR] = $1; ppid[NR] = $2; if (index(sids, " " $3 " ")) mine[$1] = 1 }
        END {
            do {
                added = 0
                for (i = 1; i <= NR; i++) if (!(pid[i] in mine) && (ppid[i] in mine)) { mine[pid[i]] = 1; added = 1 }
            } while (added)
            for (p in mine) print p
        }'
}

stop() {
    local sids=() file pids
    for file in "$DIR/worker.sid" "$DIR/head.sid"; do
        [[ -f "$file" ]] && sids+=("$(cat "$file")")
    done
    ((${#sids[@]})) || return 0
    mapfile -t pids < <(session_pids "${sids[@]}")
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        for _ in $(seq $((STOP_GRACE_S * 5))); do
            kill -0 "${pids[@]}" 2>/dev/null || break  # true while any of them is alive
            sleep 0.2
        done
        kill -KILL "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 20); do
            kill -0 "${pids[@]}" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$DIR/worker.sid" "$DIR/head.sid"
}

start() {
    if [[ -f "$DIR/head.sid" ]]; then
        echo "already started (pid files in $DIR); run '$0 stop' first" >&2
        exit 1
    fi
    mkdir -p "$DIR"
    if [[ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
        ray get-auth-token --generate >/dev/null
    fi
    start_node head --head --port "$RAY_PORT" --num-cpus 0 --num-gpus 0 \
        --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port "$CLIENT_PORT" \
        --metrics-export-port "$HEAD_METRICS_PORT" --dashboard-agent-listen-port "$HEAD_AGENT_PORT"
    start_node worker --address "127.0.0.1:$RAY_PORT" --num-cpus "$WORKER_CPUS" --num-gpus "$WORKER_GPUS" \
        --metrics-export-port "$WORKER_METRICS_PORT" --dashboard-agent-listen-port "$WORKER_AGENT_PORT"
    cat <<MSG
Ray on 127.0.0.1: head (0 CPUs for work) + worker ($WORKER_CPUS CPUs, $WORKER_GPUS logical GPUs), token auth on.
  dashboard and job API: http://127.0.0.1:$DASHBOARD_PORT
  Prometheus metrics:    http://127.0.0.1:$HEAD_METRICS_PORT/metrics (head), http://127.0.0.1:$WORKER_METRICS_PORT/metrics (worker)
  export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
  facesynth submit render --config render-quickstart output=$ROOT/out/cluster/render  # absolute: jobs run in a copy
MSG
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
esac
