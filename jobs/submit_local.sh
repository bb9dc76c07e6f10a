#!/usr/bin/env bash
# Start a local Ray head, submit the demo training job through the Jobs API, stop the head.
# Usage: jobs/submit_local.sh [hydra overrides...]   e.g. jobs/submit_local.sh rounds=2 diloco.inner_steps=10
#
# Ray 2.60 turns token authentication on for local clusters: `ray start --head` creates
# ~/.ray/auth_token if it is missing. `ray job submit` only sends that token when RAY_AUTH_MODE=token
# is set in its environment (otherwise: "Unauthorized: Missing authentication token"), so we set it.
# From another machine, copy the head's ~/.ray/auth_token there (or set RAY_AUTH_TOKEN) as well.
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
PORT=${DASHBOARD_PORT:-8265}
"$RAY" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --dashboard-port="$PORT" --disable-usage-stats
trap '"$RAY" stop --force >/dev/null 2>&1 || true' EXIT
"$RAY" job submit --address "http://127.0.0.1:$PORT" --runtime-env jobs/runtime_env.yaml \
  -- python -m neuroray.train "$@"
