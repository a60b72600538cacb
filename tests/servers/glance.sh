#!/usr/bin/env bash
# A real, standalone OpenStack Glance v2 API for the tests: `glance.sh install|start|stop|status`.
#
# start: installs Debian's glance-api (apt, noninteractive, no service started) if missing, writes
# a standalone config (trusted-headers auth instead of Keystone, sqlite, file store, one worker,
# 127.0.0.1 only), syncs the database, starts glance-api in the background and waits until
# /healthcheck answers 200. Prints the endpoint (http://127.0.0.1:PORT) as the last line of stdout.
# Idempotent: a running, healthy server is left alone.
# install: only installs what `start` needs (scripts/install-deps.sh calls it).
# stop: stops the server started by `start` (by the PID in its pidfile) and keeps its state.
#
# Every request must then carry `X-Identity-Status: Confirmed`, `X-Project-Id`, `X-User-Id` and
# `X-Roles: member,reader` (see LAB-NOTES.md, "OpenStack Glance").
#
# Environment: IMAGED_GLANCE_PORT (default 19292),
#              IMAGED_TEST_SERVERS (default /var/lib/imaged-test-servers).
# With IMAGED_GLANCE_KEYSTONE=http://127.0.0.1:PORT (and IMAGED_GLANCE_KEYSTONE_PASSWORD, the
# Keystone admin's password), the server validates Keystone tokens instead (keystonemiddleware
# auth_token, paste flavor `keystone`) and keeps its state under glance-keystone/; that is how
# tests/servers/keystone.sh runs a second, Keystone-backed Glance.
set -euo pipefail

PORT="${IMAGED_GLANCE_PORT:-19292}"
KEYSTONE="${IMAGED_GLANCE_KEYSTONE:-}"
if [ -n "$KEYSTONE" ]; then
  BASE="${IMAGED_TEST_SERVERS:-/var/lib/imaged-test-servers}/glance-keystone"
  FLAVOR=keystone
else
  BASE="${IMAGED_TEST_SERVERS:-/var/lib/imaged-test-servers}/glance"
  FLAVOR=trusted
fi
CONF="$BASE/glance-api.conf"
PASTE="$BASE/glance-api-paste.ini"
PIDFILE="$BASE/glance-api.pid"
LOG="$BASE/glance-api.log"
ENDPOINT="http://127.0.0.1:$PORT"

log() { echo "glance.sh: $*" >&2; }
die() { log "$*"; exit 1; }

healthy() {
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$ENDPOINT/healthcheck" || true)" = 200 ]
}

running_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid="$(cat "$PIDFILE")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

install_glance() {
  if command -v glance-api >/dev/null && command -v glance-manage >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "glance-api is not installed and installing it needs root"
  log "installing glance-api python3-glance (apt; about 3.5 minutes the first time)"
  # The package's maintainer scripts would start the service through invoke-rc.d; PID 1 is no
  # init system here, so forbid every service start with a policy-rc.d returning 101 (unless the
  # host already has one, which is then left untouched).
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# imaged tests: no service starts during apt-get install\nexit 101\n' \
      >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  local rc=0
  (
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends glance-api python3-glance curl
  ) >&2 || rc=$?
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  [ "$rc" = 0 ] || die "apt-get install glance-api python3-glance failed (exit $rc)"
  # Should a maintainer script have started a system glance-api anyway, it must not hold our port
  # or the default one; it runs from the system config, never ours.
  command -v glance-api >/dev/null || die "glance-api still missing after apt-get install"
}

write_config() {
  mkdir -p "$BASE/images" "$BASE/staging" "$BASE/locks"
  [ -f /etc/glance/glance-api-paste.ini ] || die "/etc/glance/glance-api-paste.ini missing (package glance-api)"
  # The package's paste file plus one pipeline: trusted headers, no Keystone.
  {
    cat /etc/glance/glance-api-paste.ini
    printf '\n# imaged tests: identity from trusted X-* headers, no Keystone\n'
    printf '[pipeline:glance-api-trusted]\n'
    printf 'pipeline = cors healthcheck http_proxy_to_wsgi versionnegotiation osprofiler context rootapp\n'
  } >"$PASTE.tmp"
  mv "$PASTE.tmp" "$PASTE"
  cat >"$CONF.tmp" <<EOF
# Written by tests/servers/glance.sh: a standalone Glance for imaged's tests.
[DEFAULT]
bind_host = 127.0.0.1
bind_port = $PORT
workers = 1
log_file = $LOG
use_stderr = false
node_staging_uri = file://$BASE/staging
enabled_import_methods = [glance-direct,web-download]
image_size_cap = 1099511627776
show_image_direct_url = false

[database]
connection = sqlite:///$BASE/glance.sqlite

[glance_store]
stores = file,http
default_store = file
filesystem_store_datadir = $BASE/images

[paste_deploy]
flavor = $FLAVOR
config_file = $PASTE

[oslo_concurrency]
lock_path = $BASE/locks

[import_filtering_opts]
allowed_hosts = [127.0.0.1]
allowed_ports = []

[oslo_policy]
enforce_scope = false
enforce_new_defaults = false
EOF
  if [ -n "$KEYSTONE" ]; then
    cat >>"$CONF.tmp" <<EOF

[keystone_authtoken]
www_authenticate_uri = $KEYSTONE
auth_url = $KEYSTONE
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = admin
username = admin
password = ${IMAGED_GLANCE_KEYSTONE_PASSWORD:?IMAGED_GLANCE_KEYSTONE_PASSWORD is required with IMAGED_GLANCE_KEYSTONE}
EOF
  fi
  chmod 600 "$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
}

start() {
  if pid="$(running_pid)" && healthy; then
    log "already running (pid $pid)"
    echo "$ENDPOINT"
    return 0
  fi
  if pid="$(running_pid)"; then
    log "pid $pid is not healthy: restarting it"
    stop
  fi
  install_glance
  command -v curl >/dev/null || die "curl not found (Debian package curl)"
  if healthy; then
    die "something else answers on $ENDPOINT: not ours (no live pid in $PIDFILE)"
  fi
  write_config
  # db_sync costs ~4 s: only when the database is new or glance-api changed version.
  local version
  version="$(dpkg-query -W -f='${Version}' glance-api 2>/dev/null || echo unknown)"
  if [ ! -f "$BASE/glance.sqlite" ] || [ "$(cat "$BASE/db-synced" 2>/dev/null)" != "$version" ]; then
    glance-manage --config-file "$CONF" db_sync >>"$LOG" 2>&1 ||
      die "glance-manage db_sync failed: see $LOG"
    echo "$version" >"$BASE/db-synced"
  fi
  # Own session so that `stop` can end the server and its worker by one process-group id; in
  # its own directory, not the caller's, which may be removed while the server lives on.
  (cd "$BASE" && exec setsid glance-api --config-file "$CONF" >>"$LOG" 2>&1 </dev/null) &
  echo $! >"$PIDFILE"
  local i
  for i in $(seq 1 240); do
    if healthy; then
      log "up on $ENDPOINT (pid $(cat "$PIDFILE"))"
      echo "$ENDPOINT"
      return 0
    fi
    if ! running_pid >/dev/null; then
      tail -n 30 "$LOG" >&2 || true
      die "glance-api exited during start: see $LOG"
    fi
    sleep 0.25
  done
  tail -n 30 "$LOG" >&2 || true
  die "glance-api did not answer $ENDPOINT/healthcheck within 60 s: see $LOG"
}

stop() {
  local pid i
  if ! pid="$(running_pid)"; then
    rm -f "$PIDFILE"
    log "not running"
    return 0
  fi
  # The process group of our setsid'd server: the parent and its worker.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  # Wait until the port is free, so an immediate `start` can bind it again.
  for i in $(seq 1 100); do
    healthy || break
    sleep 0.1
  done
  rm -f "$PIDFILE"
  log "stopped (pid $pid)"
}

case "${1:-}" in
  install) install_glance ;;
  start) start ;;
  stop) stop ;;
  status) if pid="$(running_pid)" && healthy; then echo "running $pid $ENDPOINT"; else echo stopped; exit 3; fi ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
