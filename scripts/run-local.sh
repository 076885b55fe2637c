#!/usr/bin/env bash
# `make run`: the service on embedded defaults (SQLite database, a broker that needs no server).
# Migrates, starts one worker in the background, then the API in the foreground. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
CLI=.venv/bin/calcinosis-cds
export CDS_HOST="${CDS_HOST:-127.0.0.1}" CDS_PORT="${CDS_PORT:-8080}"
$CLI migrate
.venv/bin/python scripts/example_request.py >/dev/null
worker_pid=""
if .venv/bin/python -c "import workers.celery_app" 2>/dev/null; then
  $CLI worker --concurrency 1 >var/worker.log 2>&1 &
  worker_pid=$!
  trap '[ -n "$worker_pid" ] && kill "$worker_pid" 2>/dev/null || true' EXIT
fi
base="http://${CDS_HOST}:${CDS_PORT}"
cat <<MSG

calcinosis-cds on embedded defaults (database and broker: SQLite files in var/)
  discovery:   curl ${base}/cds-services
  readiness:   curl ${base}/readyz
  a hook call: curl -s -X POST ${base}/cds-services/calcinosis-risk -H 'Content-Type: application/json' \\
                 --data @var/patient-view.json      (needs CDS_DEV_MODE=true or a signed JWT)
  API docs:    ${base}/docs
  worker log:  var/worker.log
Development mode (unsigned calls): CDS_DEV_MODE=true make run

MSG
exec $CLI serve
