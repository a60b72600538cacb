#!/usr/bin/env bash
# A real PostgreSQL server for the tests: `postgres.sh install|start|stop|status`.
#
# start: installs Debian's postgresql package if missing, creates a cluster of its own under
# $IMAGED_TEST_SERVERS/postgres/data (never the system cluster: install tells Debian's
# postgresql-common not to create one, and this cluster has its own port and directories),
# starts it with pg_ctl as the postgres user on 127.0.0.1, makes sure the test role (with a
# password, allowed to create databases: each test server gets a database of its own) and its
# database exist, and waits until it answers. Prints the URL
# (postgresql://USER:PASSWORD@127.0.0.1:PORT/DB) as the last line of stdout. Idempotent: a
# running server is left alone (the role and database are checked again).
# install: only installs what `start` needs (scripts/test.sh calls it).
# stop: stops the cluster (pg_ctl stop -m fast) and keeps its data.
#
# The cluster trades durability for speed (fsync off): it holds test data only.
#
# Environment (defaults are what tests/it/support/servers.rs expects):
#   IMAGED_PG_PORT (15432), IMAGED_PG_USER (imaged_test), IMAGED_PG_PASSWORD
#   (imaged-test-pw), IMAGED_PG_DB (imaged_test), IMAGED_TEST_SERVERS
#   (/var/lib/imaged-test-servers).
set -euo pipefail

PORT="${IMAGED_PG_PORT:-15432}"
ROLE="${IMAGED_PG_USER:-imaged_test}"
PASSWORD="${IMAGED_PG_PASSWORD:-imaged-test-pw}"
DB="${IMAGED_PG_DB:-imaged_test}"
ROOT="${IMAGED_TEST_SERVERS:-/var/lib/imaged-test-servers}"
BASE="$ROOT/postgres"
DATA="$BASE/data"
SOCK="$BASE/run"
LOG="$BASE/postgres.log"
URL="postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"

log() { echo "postgres.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# The newest installed server's binaries (Debian keeps them out of PATH).
bindir() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  [ -n "$d" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ] || return 1
  echo "$d"
}

install_pg() {
  if bindir >/dev/null && command -v psql >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "Debian's postgresql package is missing and only root can install it"
  # No system cluster: the tests run their own.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/imaged-test.conf
  log "installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q postgresql >&2 || die "apt-get install postgresql failed"
  bindir >/dev/null || die "postgresql installed but no pg_ctl under /usr/lib/postgresql/*/bin"
}

as_pg() { runuser -u postgres -- "$@"; }

ctl() { as_pg "$(bindir)/pg_ctl" -D "$DATA" "$@"; }

running() { [ -f "$DATA/postmaster.pid" ] && ctl status >/dev/null 2>&1; }

answers() { as_pg "$(bindir)/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 2; }

psql_admin() {
  as_pg psql -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -U postgres -d postgres "$@"
}

ensure_role() {
  # The password is set again each time: the URL printed is always the one that works.
  psql_admin -v role="$ROLE" -v pw="$PASSWORD" <<'SQL' >&2
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'role')
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'role', :'pw') \gexec
SQL
  psql_admin -v role="$ROLE" -v db="$DB" <<'SQL' >&2
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL
}

start() {
  local bin
  install_pg
  bin="$(bindir)"
  id postgres >/dev/null 2>&1 || die "no postgres user (Debian's postgresql package makes it)"
  mkdir -p "$ROOT"
  chmod o+x "$ROOT"
  mkdir -p "$BASE" "$SOCK"
  chown postgres:postgres "$BASE" "$SOCK"
  chmod 700 "$BASE"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    log "creating the test cluster in $DATA"
    as_pg "$bin/initdb" -D "$DATA" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
      -E UTF8 --locale=C.UTF-8 >&2 || die "initdb -D $DATA failed"
  fi
  if running && answers; then
    log "already running on 127.0.0.1:$PORT"
  else
    if answers; then
      die "something else answers on 127.0.0.1:$PORT: not our cluster ($DATA)"
    fi
    ctl -l "$LOG" -w -t 60 -o "-c listen_addresses=127.0.0.1 -p $PORT -k $SOCK \
      -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
      start >&2 || { tail -n 20 "$LOG" >&2 || true; die "pg_ctl start failed: see $LOG"; }
    answers || die "the cluster started but does not answer on 127.0.0.1:$PORT: see $LOG"
    log "up on 127.0.0.1:$PORT ($DATA)"
  fi
  ensure_role
  echo "$URL"
}

stop() {
  if ! running; then
    log "not running"
    return 0
  fi
  ctl -m fast -w stop >&2
  log "stopped"
}

case "${1:-}" in
  install) install_pg ;;
  start) start ;;
  stop) stop ;;
  status) if running && answers; then echo "running $URL"; else echo stopped; exit 3; fi ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
