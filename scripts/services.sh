#!/usr/bin/env bash
# Start, check or stop the services the integration tests need, natively (no Docker).
# The compose stack (compose.yaml) runs the same services in containers.
#   scripts/services.sh up       make sure PostgreSQL answers and the test database exists
#   scripts/services.sh status   print what answers
#   scripts/services.sh down     stop what this script started (PostgreSQL is the machine's: left alone)
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
TEST_DB=${WORKBENCH_TEST_DB:-workbench_test}
export PGHOST PGPORT PGUSER

pg_answers() { psql -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; }

postgres_up() {
  if ! pg_answers; then
    echo "PostgreSQL does not answer on $PGHOST:$PGPORT; trying to start the local cluster" >&2
    if command -v pg_ctlcluster >/dev/null 2>&1 && ls /etc/postgresql >/dev/null 2>&1; then
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
    fi
  fi
  for _ in $(seq 1 30); do pg_answers && break; sleep 1; done
  if ! pg_answers; then
    echo "error: PostgreSQL is not reachable at $PGHOST:$PGPORT as $PGUSER" >&2
    return 1
  fi
  if [ "$(psql -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$TEST_DB'")" != "1" ]; then
    psql -d postgres -qc "CREATE DATABASE \"$TEST_DB\"" >/dev/null
  fi
  echo "postgres: ok ($PGHOST:$PGPORT, database $TEST_DB)"
}

case "${1:-}" in
  up) postgres_up ;;
  status) pg_answers && echo "postgres: ok" || echo "postgres: down" ;;
  down) : ;;
  *) echo "usage: $0 up|status|down" >&2; exit 2 ;;
esac
