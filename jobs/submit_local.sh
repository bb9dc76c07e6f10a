#!/usr/bin/env bash
# Start a private Ray head on this machine, submit the training job through the Jobs API, stop that head.
# Usage: jobs/submit_local.sh [hydra overrides...]   e.g. jobs/submit_local.sh rounds=2 diloco.inner_steps=10
#
# * The head is yours alone: its own temp dir and free ports. Every service listens on 127.0.0.1 only:
#   Ray resolves --node-ip-address=127.0.0.1 to the machine's external IP, and GCS, raylet, object
#   manager, agents and workers then listen on all interfaces, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
#   (Ray's single-node mode, the default on macOS and Windows), which keeps the node IP at 127.0.0.1.
#   That mode refuses worker nodes: for a real cluster see the README ("Bind addresses").
#   It runs as `ray start --block` in the background and is stopped by signalling that process, so
#   any other Ray on the machine (yours, a colleague's, a test suite's) keeps running. It never runs `ray stop`.
# * The job's `python` is the project's: the head starts with the venv's bin/ first on its PATH, and a
#   job's entrypoint inherits the PATH of the `ray start` that made the cluster.
# * Token authentication (Ray 2.60): `ray start --head` does not create a token, so the script makes
#   ~/.ray/auth_token if there is none (`ray get-auth-token --generate`); head and `ray job submit` then
#   run with RAY_AUTH_MODE=token (the client only sends the token when that is set).
# Environment: NEURORAY_PYTHON (default .venv/bin/python), NEURORAY_HEAD_TIMEOUT_S (default 300: how long
# the head's job agent may take to accept the job on a loaded machine), NEURORAY_NUM_CPUS (default: all).
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
cd "$(dirname "$0")/.."
PY=${NEURORAY_PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "submit_local.sh: error: no Python at $PY; run \`make venv\` first (or set NEURORAY_PYTHON)" >&2
  exit 2
fi
BIN=$(cd "$(dirname "$PY")" && pwd)
RAY="$BIN/ray"
HEAD_TIMEOUT_S=${NEURORAY_HEAD_TIMEOUT_S:-300}

# eight distinct free ports, all held open together while chosen so that none is handed out twice
read -r GCS DASH AGENT_HTTP AGENT_GRPC RUNTIME_ENV METRICS CLIENT NODE_MANAGER < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
TEMP_DIR=$(mktemp -d /tmp/neuroray-ray.XXXXXX)
if [ "$RAY_AUTH_MODE" = token ]; then
  "$RAY" get-auth-token --generate >/dev/null  # prints the token: keep it off the terminal and the logs
fi

PATH="$BIN:$PATH" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$RAY" start --head --block --disable-usage-stats --temp-dir="$TEMP_DIR" \
  --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
  --port="$GCS" --dashboard-port="$DASH" --dashboard-agent-listen-port="$AGENT_HTTP" \
  --dashboard-agent-grpc-port="$AGENT_GRPC" --runtime-env-agent-port="$RUNTIME_ENV" \
  --metrics-export-port="$METRICS" --ray-client-server-port="$CLIENT" --node-manager-port="$NODE_MANAGER" \
  ${NEURORAY_NUM_CPUS:+--num-cpus="$NEURORAY_NUM_CPUS"} >"$TEMP_DIR/ray-start.log" 2>&1 &
HEAD_PID=$!
stop_head() {
  # SIGTERM to `ray start --block` stops the processes of this head only; then its temp dir goes
  kill "$HEAD_PID" 2>/dev/null && wait "$HEAD_PID" 2>/dev/null || true
  rm -rf "$TEMP_DIR"
}
trap stop_head EXIT
echo "ray head: pid $HEAD_PID, dashboard http://127.0.0.1:$DASH, Prometheus metrics http://127.0.0.1:$METRICS/metrics, temp dir $TEMP_DIR"

# The dashboard (the Jobs API) listens seconds, on a loaded machine minutes, after `ray start` began;
# the job agent after that: until then a submission is refused with "No available agent" (nothing was
# started, so submitting again is safe).
deadline=$((SECONDS + HEAD_TIMEOUT_S))
head_alive() {
  kill -0 "$HEAD_PID" 2>/dev/null && return 0
  echo "submit_local.sh: error: the Ray head exited; the end of its log:" >&2
  tail -20 "$TEMP_DIR/ray-start.log" >&2
  exit 1
}
until "$PY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
    "$DASH" 2>/dev/null; do
  head_alive
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "submit_local.sh: error: the dashboard did not listen within NEURORAY_HEAD_TIMEOUT_S=$HEAD_TIMEOUT_S s" >&2
    exit 1
  fi
  sleep 1
done
while :; do
  head_alive
  set +e
  "$RAY" job submit --address "http://127.0.0.1:$DASH" --runtime-env jobs/runtime_env.yaml \
    -- python -m neuroray.train "$@" 2>&1 | tee "$TEMP_DIR/submit.log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -eq 0 ] || ! grep -q "No available agent" "$TEMP_DIR/submit.log" || [ "$SECONDS" -ge "$deadline" ]; then
    exit "$rc"
  fi
  sleep 2
done
