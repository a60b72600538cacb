#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine as root: installs the packages, starts
# libvirt, builds (once, cached) the Debian test guest, then runs every test: unit tests, the
# NBD client against qemu-nbd and nbdkit, the qcow2 encoder judged by qemu-img, the daemon end
# to end, and captures of real guests under libvirt. Tests that need a real part fail (never
# skip) when it cannot be set up.
set -euo pipefail
cd "$(dirname "$0")/.."

# A run stops what it started: the test servers (Glance, Keystone, S3, started lazily by the
# tests) and libvirt's daemons that were not running before are stopped on exit, also when a
# step fails or the run is interrupted; what was running before is left running.
running_before="$(mktemp /tmp/imaged-test-running.XXXXXX)"
bash scripts/test-servers.sh record "$running_before"
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  bash scripts/test-servers.sh stop-started "$running_before" || true
  rm -f "$running_before"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

scripts/install-deps.sh
# grpcio, grpcio-tools, grpcio-reflection (pip) for the Python client test (tests/it/python_client.rs).
scripts/install-python-deps.sh
# Real servers for the Glance and S3 target tests (tests/it/targets.rs): apt glance-api,
# python3-glance, python3-keystone, curl (no service started through init); cargo s3s-fs (also
# imagerepo's S3 chunks); apt postgresql (imagerepo's second catalog, a cluster of its own).
for s in glance keystone s3 postgres; do bash tests/servers/$s.sh install; done
tests/lab/start-libvirt.sh
tests/lab/build-guest.sh >/dev/null
tests/lab/pick-accel.sh >/dev/null

# Two cores: two test threads, so two TCG guests at most run at once. The integration tests are
# one binary (tests/it); one module's tests: `cargo test --test it MODULE::`.
cargo test --locked --no-fail-fast -- --test-threads=2
