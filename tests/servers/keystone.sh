#!/usr/bin/env bash
# A real Keystone v3 and a second Glance that trusts it, for the Keystone auth tests:
# `keystone.sh install|start|stop|status`.
#
# start: installs python3-keystone (apt, noninteractive; ~10 s once glance-api is installed) and
# glance-api if missing, creates a standalone Keystone (sqlite, fernet tokens; db_sync, fernet
# and credential setup and bootstrap on first use), runs it with the package's own WSGI script
# (keystone-wsgi-public, a single-threaded wsgiref server: fine for tests) on 127.0.0.1, then
# provisions, idempotently: project `imaged-test`, user `imaged-test` with role `member` on it,
# and the service catalog entry `image` pointing at a second Glance, which is started by
# `glance.sh` in Keystone mode (keystonemiddleware validates every token). Prints the Keystone
# URL (http://127.0.0.1:PORT) as the last line of stdout.
# install: only installs what `start` needs (scripts/install-deps.sh calls it).
# stop: stops that Glance and Keystone (by their pidfiles); state is kept.
#
# Fixed test identities (what tests/it/support/servers.rs expects):
#   admin / imaged-test-admin (project admin), imaged-test / imaged-test-pw (project
#   imaged-test, role member), all in domain Default, region RegionOne.
# Environment: IMAGED_KEYSTONE_PORT (15000), IMAGED_GLANCE_KS_PORT (19293),
#              IMAGED_TEST_SERVERS (/var/lib/imaged-test-servers).
set -euo pipefail

PORT="${IMAGED_KEYSTONE_PORT:-15000}"
GLANCE_PORT="${IMAGED_GLANCE_KS_PORT:-19293}"
ROOT="${IMAGED_TEST_SERVERS:-/var/lib/imaged-test-servers}"
BASE="$ROOT/keystone"
CONF="$BASE/keystone.conf"
PIDFILE="$BASE/keystone.pid"
LOG="$BASE/keystone.log"
ENDPOINT="http://127.0.0.1:$PORT"
GLANCE_ENDPOINT="http://127.0.0.1:$GLANCE_PORT"
ADMIN_PASSWORD=imaged-test-admin
USER_PASSWORD=imaged-test-pw
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=/usr/bin/python3

log() { echo "keystone.sh: $*" >&2; }
die() { log "$*"; exit 1; }

healthy() {
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$ENDPOINT/v3" || true)" = 200 ]
}

running_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid="$(cat "$PIDFILE")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

glance_ks() {
  IMAGED_GLANCE_KEYSTONE="$ENDPOINT" IMAGED_GLANCE_KEYSTONE_PASSWORD="$ADMIN_PASSWORD" \
    IMAGED_GLANCE_PORT="$GLANCE_PORT" IMAGED_TEST_SERVERS="$ROOT" bash "$HERE/glance.sh" "$@"
}

install_keystone() {
  if command -v keystone-manage >/dev/null && command -v keystone-wsgi-public >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "python3-keystone is not installed and installing it needs root"
  log "installing python3-keystone (apt)"
  # The library package starts no service; policy-rc.d handling lives in glance.sh.
  (
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends python3-keystone curl
  ) >&2 || die "apt-get install python3-keystone failed"
}

# python3-keystone, and glance-api for the Keystone-backed Glance.
install_keystone_all() {
  install_keystone
  bash "$HERE/glance.sh" install
}

setup_keystone() {
  mkdir -p "$BASE"
  chmod 700 "$BASE"
  cat >"$CONF" <<EOF
# Written by tests/servers/keystone.sh: a standalone Keystone for imaged's tests.
[DEFAULT]
log_file = $LOG
use_stderr = false

[database]
connection = sqlite:///$BASE/keystone.sqlite

[token]
provider = fernet

[fernet_tokens]
key_repository = $BASE/fernet-keys

[fernet_receipts]
key_repository = $BASE/fernet-keys

[credential]
key_repository = $BASE/credential-keys
EOF
  if [ ! -f "$BASE/bootstrapped" ]; then
    log "creating the Keystone database and keys (first start)"
    mkdir -p "$BASE/fernet-keys" "$BASE/credential-keys"
    keystone-manage --config-file "$CONF" db_sync >>"$LOG" 2>&1 || die "keystone db_sync failed: see $LOG"
    keystone-manage --config-file "$CONF" fernet_setup --keystone-user root --keystone-group root \
      >>"$LOG" 2>&1 || die "keystone fernet_setup failed: see $LOG"
    keystone-manage --config-file "$CONF" credential_setup --keystone-user root --keystone-group root \
      >>"$LOG" 2>&1 || die "keystone credential_setup failed: see $LOG"
    keystone-manage --config-file "$CONF" bootstrap --bootstrap-password "$ADMIN_PASSWORD" \
      --bootstrap-admin-url "$ENDPOINT/v3/" --bootstrap-internal-url "$ENDPOINT/v3/" \
      --bootstrap-public-url "$ENDPOINT/v3/" --bootstrap-region-id RegionOne \
      >>"$LOG" 2>&1 || die "keystone bootstrap failed: see $LOG"
    touch "$BASE/bootstrapped"
  fi
  # In rollback-journal mode a read transaction that one request leaves open blocks the next
  # request's commit ("database is locked"); in WAL mode readers never block the writer.
  "$PY" -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute("PRAGMA journal_mode=WAL")' \
    "$BASE/keystone.sqlite"
}

# Project, user, role and the image service's catalog entry, through the real API.
provision() {
  ENDPOINT="$ENDPOINT" GLANCE_ENDPOINT="$GLANCE_ENDPOINT" ADMIN_PASSWORD="$ADMIN_PASSWORD" \
    USER_PASSWORD="$USER_PASSWORD" "$PY" - <<'PYEOF'
import json, os, urllib.request, urllib.error

ks = os.environ["ENDPOINT"] + "/v3"

def call(method, path, body=None, token=None, ok=(200, 201, 204)):
    req = urllib.request.Request(ks + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Auth-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode() or "{}"
            return r.status, json.loads(text), r.headers
    except urllib.error.HTTPError as e:
        if e.code in ok:
            return e.code, {}, e.headers
        raise SystemExit(f"keystone {method} {path}: {e.code} {e.read()[:300]!r}")

_, _, h = call("POST", "/auth/tokens", {"auth": {
    "identity": {"methods": ["password"], "password": {"user": {
        "name": "admin", "domain": {"name": "Default"}, "password": os.environ["ADMIN_PASSWORD"]}}},
    "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}}}})
tok = h["X-Subject-Token"]

def find(kind, key, name, extra=""):
    _, doc, _ = call("GET", f"/{kind}?name={name}{extra}", token=tok)
    items = doc.get(kind, [])
    return items[0] if items else None

project = find("projects", "project", "imaged-test") or call(
    "POST", "/projects", {"project": {"name": "imaged-test", "domain_id": "default"}}, tok)[1]["project"]
user = find("users", "user", "imaged-test")
if user is None:
    user = call("POST", "/users", {"user": {"name": "imaged-test", "domain_id": "default",
        "password": os.environ["USER_PASSWORD"], "default_project_id": project["id"]}}, tok)[1]["user"]
else:
    # Only when the password no longer works: a password change revokes the user's tokens,
    # including new ones issued within the same second.
    st, _, _ = call("POST", "/auth/tokens", {"auth": {"identity": {"methods": ["password"],
        "password": {"user": {"id": user["id"], "password": os.environ["USER_PASSWORD"]}}}}},
        ok=(200, 201, 401))
    if st == 401:
        call("PATCH", f"/users/{user['id']}", {"user": {"password": os.environ["USER_PASSWORD"]}}, tok)
        import time
        time.sleep(1.5)
member = find("roles", "role", "member")
call("PUT", f"/projects/{project['id']}/users/{user['id']}/roles/{member['id']}", token=tok)

svc = find("services", "service", "glance")
if svc is None:
    svc = call("POST", "/services", {"service": {"name": "glance", "type": "image"}}, tok)[1]["service"]
_, doc, _ = call("GET", f"/endpoints?service_id={svc['id']}", token=tok)
want = os.environ["GLANCE_ENDPOINT"]
have = {(e["interface"], e["url"]) for e in doc.get("endpoints", [])}
for e in doc.get("endpoints", []):
    if e["url"] != want:
        call("DELETE", f"/endpoints/{e['id']}", token=tok)
for iface in ("public", "internal"):
    if (iface, want) not in have:
        call("POST", "/endpoints", {"endpoint": {"service_id": svc["id"], "interface": iface,
             "url": want, "region_id": "RegionOne"}}, tok)
PYEOF
}

start() {
  local pid i
  install_keystone
  command -v curl >/dev/null || die "curl not found (Debian package curl)"
  if pid="$(running_pid)" && healthy; then
    log "keystone already running (pid $pid)"
  else
    if pid="$(running_pid)"; then
      log "pid $pid is not healthy: restarting it"
      stop_keystone
    fi
    healthy && die "something else answers on $ENDPOINT: not ours (no live pid in $PIDFILE)"
    setup_keystone
    # In its own directory, not the caller's, which may be removed while the server lives on.
    (cd "$BASE" && exec setsid keystone-wsgi-public --host 127.0.0.1 --port "$PORT" -- \
      --config-file "$CONF" >>"$LOG" 2>&1 </dev/null) &
    echo $! >"$PIDFILE"
    for i in $(seq 1 240); do
      healthy && break
      if ! running_pid >/dev/null; then
        tail -n 30 "$LOG" >&2 || true
        die "keystone exited during start: see $LOG"
      fi
      sleep 0.25
    done
    healthy || die "keystone did not answer $ENDPOINT/v3 within 60 s: see $LOG"
    log "keystone up on $ENDPOINT (pid $(cat "$PIDFILE"))"
  fi
  provision || die "provisioning keystone failed"
  glance_ks start >&2 || die "starting the keystone-backed glance failed"
  echo "$ENDPOINT"
}

stop_keystone() {
  local pid i
  if ! pid="$(running_pid)"; then
    rm -f "$PIDFILE"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; }
  rm -f "$PIDFILE"
  log "keystone stopped (pid $pid)"
}

case "${1:-}" in
  install) install_keystone_all ;;
  start) start ;;
  stop) glance_ks stop; stop_keystone ;;
  status) if pid="$(running_pid)" && healthy; then echo "running $pid $ENDPOINT"; else echo stopped; exit 3; fi ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
