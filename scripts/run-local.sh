#!/usr/bin/env bash
# `make run`: the service on embedded defaults (SQLite database, a broker that needs no server).
# Migrates, starts one worker and the API, and waits for the API. Ctrl-C (or a TERM) stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
CLI=.venv/bin/calcinosis-cds
export CDS_HOST="${CDS_HOST:-127.0.0.1}" CDS_PORT="${CDS_PORT:-8080}"
$CLI migrate
.venv/bin/python scripts/example_request.py >/dev/null
worker_pid="" serve_pid=""
# Whatever ends this script (Ctrl-C, a TERM, the API failing to start) stops the worker and the API with it.
cleanup() {
  trap - INT TERM EXIT
  kill -TERM $worker_pid $serve_pid 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT
if .venv/bin/python -c "import workers.celery_app" 2>/dev/null; then
  $CLI worker --concurrency 1 >var/worker.log 2>&1 &
  worker_pid=$!
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
MSG
case "$(printf %s "${CDS_DEV_MODE:-}" | tr '[:upper:]' '[:lower:]')" in
  1 | true | t | yes | y | on) echo "Development mode is ON: unsigned calls are accepted." ;;
  *) echo "Development mode (unsigned calls): CDS_DEV_MODE=true make run" ;;
esac
echo
$CLI serve &
serve_pid=$!
wait "$serve_pid"
