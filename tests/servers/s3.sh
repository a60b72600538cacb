#!/usr/bin/env bash
# A real S3-compatible server for the tests: `s3.sh install|start|stop|status`.
#
# start: installs s3s-fs 0.14.1 (`cargo install`, about 5 minutes the first time; 0.15+ needs a
# newer Rust) if missing, starts it on 127.0.0.1 over a data directory with signature checking on,
# creates the test bucket and waits until it answers. Prints the endpoint (http://127.0.0.1:PORT)
# as the last line of stdout. Idempotent: a running server is left alone.
# install: only installs what `start` needs (scripts/install-deps.sh calls it).
# stop: stops the server started by `start` (by the PID in its pidfile) and keeps its data.
#
# s3s-fs maps a bucket to a directory under its root (DATA/BUCKET/KEY); multipart uploads in
# progress live in the root as `.upload-UUID.json` and `.upload_id-UUID.part-N` files, which the
# tests inspect to prove that no upload was left behind (s3s-fs has no ListMultipartUploads).
#
# Environment (defaults are what tests/it/support/servers.rs expects):
#   IMAGED_S3_PORT (19000), IMAGED_S3_ACCESS_KEY (imaged-test), IMAGED_S3_SECRET_KEY
#   (imaged-test-secret), IMAGED_S3_BUCKET (imaged-test), IMAGED_TEST_SERVERS
#   (/var/lib/imaged-test-servers).
set -euo pipefail

PORT="${IMAGED_S3_PORT:-19000}"
ACCESS_KEY="${IMAGED_S3_ACCESS_KEY:-imaged-test}"
SECRET_KEY="${IMAGED_S3_SECRET_KEY:-imaged-test-secret}"
BUCKET="${IMAGED_S3_BUCKET:-imaged-test}"
BASE="${IMAGED_TEST_SERVERS:-/var/lib/imaged-test-servers}/s3"
DATA="$BASE/data"
PIDFILE="$BASE/s3s-fs.pid"
LOG="$BASE/s3s-fs.log"
ENDPOINT="http://127.0.0.1:$PORT"
VERSION=0.14.1

log() { echo "s3.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# Any HTTP answer counts (an unsigned request gets 403): the server is listening.
answers() {
  local code
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$ENDPOINT/" || true)"
  [ -n "$code" ] && [ "$code" != 000 ]
}

running_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid="$(cat "$PIDFILE")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

find_bin() {
  local b
  for b in "$(command -v s3s-fs 2>/dev/null || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"; do
    if [ -n "$b" ] && [ -x "$b" ] && "$b" --version 2>/dev/null | grep -q "$VERSION"; then
      echo "$b"
      return 0
    fi
  done
  return 1
}

install_s3s() {
  local bin
  if bin="$(find_bin)"; then
    echo "$bin"
    return 0
  fi
  command -v cargo >/dev/null || die "cargo not found: s3s-fs $VERSION is installed with cargo install"
  log "installing s3s-fs $VERSION (cargo install; about 5 minutes the first time)"
  cargo install "s3s-fs@$VERSION" --features binary --locked >&2 ||
    die "cargo install s3s-fs@$VERSION --features binary --locked failed"
  find_bin || die "s3s-fs $VERSION still not found after cargo install"
}

start() {
  local pid bin i
  mkdir -p "$DATA/$BUCKET"
  if pid="$(running_pid)" && answers; then
    log "already running (pid $pid)"
    echo "$ENDPOINT"
    return 0
  fi
  if pid="$(running_pid)"; then
    log "pid $pid does not answer: restarting it"
    stop
  fi
  command -v curl >/dev/null || die "curl not found (Debian package curl)"
  bin="$(install_s3s)"
  if answers; then
    die "something else answers on $ENDPOINT: not ours (no live pid in $PIDFILE)"
  fi
  # The bucket is a directory of the root; creating it here needs no signed CreateBucket call.
  mkdir -p "$DATA/$BUCKET"
  # Started in its own directory: s3s-fs resolves object paths against its working directory,
  # and a caller's directory can be removed while the server lives on (it then answers every
  # listing with 500 InternalError, seen after a test run's worktree was deleted).
  (cd "$BASE" && RUST_LOG="${RUST_LOG:-info}" exec setsid "$bin" --host 127.0.0.1 --port "$PORT" \
    --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" "$DATA" >>"$LOG" 2>&1 </dev/null) &
  echo $! >"$PIDFILE"
  for i in $(seq 1 100); do
    if answers; then
      log "up on $ENDPOINT (pid $(cat "$PIDFILE")), bucket $BUCKET in $DATA"
      echo "$ENDPOINT"
      return 0
    fi
    if ! running_pid >/dev/null; then
      tail -n 20 "$LOG" >&2 || true
      die "s3s-fs exited during start: see $LOG"
    fi
    sleep 0.1
  done
  tail -n 20 "$LOG" >&2 || true
  die "s3s-fs did not answer on $ENDPOINT within 10 s: see $LOG"
}

stop() {
  local pid i
  if ! pid="$(running_pid)"; then
    rm -f "$PIDFILE"
    log "not running"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  log "stopped (pid $pid)"
}

case "${1:-}" in
  install) install_s3s >/dev/null ;;
  start) start ;;
  stop) stop ;;
  status) if pid="$(running_pid)" && answers; then echo "running $pid $ENDPOINT"; else echo stopped; exit 3; fi ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
