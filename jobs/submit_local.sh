#!/usr/bin/env bash
# Start a local Ray head, submit the demo training job through the Jobs API, stop the head.
# Usage: jobs/submit_local.sh [hydra overrides...]   e.g. jobs/submit_local.sh rounds=2 diloco.inner_steps=10
#
# Ray 2.60 turns token authentication on for local clusters: `ray start --head` creates
# ~/.ray/auth_token if it is missing, and `ray job submit` on the same machine reads it from there.
# From another machine, copy that file to ~/.ray/auth_token (or set RAY_AUTH_TOKEN) before submitting.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
PORT=${DASHBOARD_PORT:-8265}
"$RAY" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --dashboard-port="$PORT" --disable-usage-stats
trap '"$RAY" stop --force >/dev/null 2>&1 || true' EXIT
"$RAY" job submit --address "http://127.0.0.1:$PORT" --runtime-env jobs/runtime_env.yaml \
  -- python -m neuroray.train "$@"
