#!/usr/bin/env bash
# Start, check or stop the full stack natively (no Docker): PostgreSQL (Optuna storage and MLflow
# backend store), an S3 endpoint for MLflow artifacts, and the MLflow tracking server.
# compose.yaml runs the same services in containers with the same ports and variable names;
# on machines without MinIO, moto's standalone S3 server stands in for it.
#
#   scripts/services.sh up       start what is not running, wait until each answers
#   scripts/services.sh status   print what answers
#   scripts/services.sh down     stop what this script started (the machine's PostgreSQL stays)
#   scripts/services.sh env      print the environment (export lines) that points at the stack
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
STATE=${WORKBENCH_SERVICES_DIR:-$ROOT/.workbench/services}

export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
TEST_DB=${WORKBENCH_TEST_DB:-workbench_test}
MLFLOW_DB=${MLFLOW_DB:-mlflow}
S3_PORT=${S3_PORT:-9000}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_BUCKET=${MLFLOW_BUCKET:-mlflow}
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-workbench}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-workbench-secret}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
export MLFLOW_S3_ENDPOINT_URL=${MLFLOW_S3_ENDPOINT_URL:-http://127.0.0.1:$S3_PORT}
MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT

pg_answers() { psql -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; }
http_answers() { "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" >/dev/null 2>&1; }
wait_for() {  # wait_for NAME SECONDS CHECK...
  local name=$1 seconds=$2; shift 2
  for _ in $(seq 1 "$seconds"); do "$@" && return 0; sleep 1; done
  echo "error: $name did not answer within ${seconds}s (log: $STATE/$name.log)" >&2
  [ -f "$STATE/$name.log" ] && tail -n 20 "$STATE/$name.log" >&2
  return 1
}
create_db() {
  if [ "$(psql -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$1'")" != "1" ]; then
    psql -d postgres -qc "CREATE DATABASE \"$1\"" >/dev/null
  fi
}
start_bg() {  # start_bg NAME COMMAND...: own process group, so `down` stops the whole tree
  local name=$1; shift
  mkdir -p "$STATE"
  setsid "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
}
stop_bg() {
  local pidfile=$STATE/$1.pid
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "$1: stopped"
}

postgres_up() {
  if ! pg_answers && command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "PostgreSQL does not answer on $PGHOST:$PGPORT; starting the local cluster" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
  fi
  wait_for postgres 30 pg_answers
  create_db "$TEST_DB"
  create_db "$MLFLOW_DB"
  echo "postgres: ok ($PGHOST:$PGPORT, databases $TEST_DB, $MLFLOW_DB)"
}

s3_up() {
  if ! http_answers "$MLFLOW_S3_ENDPOINT_URL"; then
    start_bg s3 "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
    wait_for s3 30 http_answers "$MLFLOW_S3_ENDPOINT_URL"
  fi
  "$PY" - "$MLFLOW_BUCKET" <<'PY'
import os, sys
import boto3
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
if sys.argv[1] not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=sys.argv[1])
PY
  echo "s3: ok ($MLFLOW_S3_ENDPOINT_URL, bucket $MLFLOW_BUCKET)"
}

mlflow_up() {
  if ! http_answers "$MLFLOW_URL/health"; then
    # No job-execution workers: the server starts in ~10 s instead of ~40 s.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start_bg mlflow "$BIN/mlflow" server \
      --backend-store-uri "postgresql+psycopg2://$PGUSER@$PGHOST:$PGPORT/$MLFLOW_DB" \
      --artifacts-destination "s3://$MLFLOW_BUCKET/" \
      --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2 \
      --allowed-hosts "127.0.0.1:$MLFLOW_PORT,localhost:$MLFLOW_PORT,127.0.0.1,localhost"
    wait_for mlflow 120 http_answers "$MLFLOW_URL/health"
  fi
  echo "mlflow: ok ($MLFLOW_URL)"
}

print_env() {
  cat <<ENV
export WORKBENCH_TEST_POSTGRES_URL=postgresql+psycopg2://$PGUSER@$PGHOST:$PGPORT/$TEST_DB
export WORKBENCH_TEST_MLFLOW_URI=$MLFLOW_URL
export MLFLOW_S3_ENDPOINT_URL=$MLFLOW_S3_ENDPOINT_URL
export MLFLOW_BUCKET=$MLFLOW_BUCKET
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
ENV
}

case "${1:-}" in
  up) postgres_up; s3_up; mlflow_up ;;
  down) stop_bg mlflow; stop_bg s3 ;;
  status)
    pg_answers && echo "postgres: ok" || echo "postgres: down"
    http_answers "$MLFLOW_S3_ENDPOINT_URL" && echo "s3: ok" || echo "s3: down"
    http_answers "$MLFLOW_URL/health" && echo "mlflow: ok" || echo "mlflow: down" ;;
  env) print_env ;;
  *) echo "usage: $0 up|status|down|env" >&2; exit 2 ;;
esac
