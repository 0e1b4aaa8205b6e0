#!/usr/bin/env bash
# Look at a study in optuna-dashboard as a browser renders it (not a test): serves the dashboard on a free local
# port, takes headless-Chromium screenshots of the study page and of one trial's page (note, artifacts), stops it.
#   benchmarks/dashboard_screenshot.sh STORAGE_URL ARTIFACT_DIR [OUT_DIR] [STUDY_ID] [TRIAL_ID]
#   e.g. benchmarks/dashboard_screenshot.sh sqlite:///studies/digits-ackd.db studies/digits-ackd-artifacts /tmp/shots
# Needs chromium (apt-get install -y chromium).
set -euo pipefail
storage=$1; artifacts=$2; out=${3:-/tmp/dashboard-shots}; study=${4:-1}; trial=${5:-1}
root=$(cd "$(dirname "$0")/.." && pwd)
port=$("$root/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$out"
"$root/.venv/bin/optuna-dashboard" --host 127.0.0.1 --port "$port" --artifact-dir "$artifacts" "$storage" \
    > "$out/dashboard.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$port/api/studies" > /dev/null && break; sleep 0.2; done
shoot() {  # name url
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --virtual-time-budget=8000 \
        --window-size=1400,1600 --screenshot="$out/$1.png" "$2" > /dev/null 2>&1
    echo "$out/$1.png"
}
shoot study "http://127.0.0.1:$port/dashboard/studies/$study"
shoot trial "http://127.0.0.1:$port/dashboard/studies/$study/trials?numbers=$trial"
shoot trial-table "http://127.0.0.1:$port/dashboard/studies/$study/trialTable"
