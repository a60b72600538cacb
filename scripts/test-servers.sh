#!/usr/bin/env bash
# What a test run started, it stops: `test-servers.sh record FILE` writes to FILE which of the
# test servers (tests/servers/{glance,keystone,s3}.sh) and libvirt's daemons (libvirtd, virtlogd,
# by their pidfiles in /run) are running now; `test-servers.sh stop-started FILE` later stops
# those that were not (started by the run itself or lazily by its tests), and leaves running what
# the run found running. scripts/test.sh calls `record` first and `stop-started` from its exit
# trap (also on failure and on Ctrl-C).
#
# The servers' scripts read IMAGED_TEST_SERVERS and their port variables; both calls must see the
# same environment. keystone.sh's stop also stops the Keystone-backed Glance it started.
set -uo pipefail
cd "$(dirname "$0")/.."

SERVERS=(keystone glance s3)
LIBVIRT_DAEMONS=(libvirtd virtlogd)

say() { echo "test-servers: $*" >&2; }

# alive PIDFILE: true when the pid written in PIDFILE is a live process.
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

record() {
  local file="$1" s d
  : >"$file"
  for s in "${SERVERS[@]}"; do
    if bash "tests/servers/$s.sh" status >/dev/null 2>&1; then
      echo "$s" >>"$file"
    fi
  done
  for d in "${LIBVIRT_DAEMONS[@]}"; do
    if alive "/run/$d.pid"; then
      echo "$d" >>"$file"
    fi
  done
  say "running before the tests: $(tr '\n' ' ' <"$file")"
}

# stop_daemon NAME: SIGTERM to the pid in /run/NAME.pid, SIGKILL after 15 s.
stop_daemon() {
  local pidfile="/run/$1.pid" pid i
  alive "$pidfile" || return 0
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  say "stopped $1 (pid $pid), which the tests had started"
}

stop_started() {
  local file="$1" s d
  [ -f "$file" ] || { say "no record $file: stopping nothing"; return 0; }
  for s in "${SERVERS[@]}"; do
    grep -qx "$s" "$file" && continue
    # `stop` is a no-op for a server that was never started.
    if bash "tests/servers/$s.sh" status >/dev/null 2>&1 || [ -n "$(pidfile_of "$s")" ]; then
      bash "tests/servers/$s.sh" stop >/dev/null 2>&1 || say "stopping $s failed"
      say "stopped $s, which the tests had started"
    fi
  done
  for d in "${LIBVIRT_DAEMONS[@]}"; do
    grep -qx "$d" "$file" && continue
    stop_daemon "$d"
  done
}

# pidfile_of SERVER: its pidfile when one is there (a server that is up but not healthy).
pidfile_of() {
  local root="${IMAGED_TEST_SERVERS:-/var/lib/imaged-test-servers}" f
  case "$1" in
    glance) f="$root/glance/glance-api.pid" ;;
    keystone) f="$root/keystone/keystone.pid" ;;
    s3) f="$root/s3/s3s-fs.pid" ;;
  esac
  [ -f "$f" ] && echo "$f"
}

case "${1:-}" in
  record) record "${2:?usage: $0 record FILE}" ;;
  stop-started) stop_started "${2:?usage: $0 stop-started FILE}" ;;
  *) echo "usage: $0 record|stop-started FILE" >&2; exit 2 ;;
esac
