#!/usr/bin/env bash
# Python packages for tests/it/python_client.rs (a stock Python gRPC client of imaged): grpcio,
# grpcio-tools (stubs from proto/imaged/v1/imaged.proto), grpcio-reflection (Python's stock
# reflection client) and googleapis-common-protos (google.longrunning, google.rpc error details), pinned to the versions the test was run with, installed with the pip of the
# `python3` on PATH (pyenv's CPython here), then checked by importing them.
set -euo pipefail

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "install-python-deps: $PY not found: install Python 3 with pip" >&2; exit 1; }
# --break-system-packages: Debian's own python3 refuses pip installs outside a venv (PEP 668);
# these test-only packages do not touch what Debian's packages provide.
# A stock Debian 12 has python3 but not its pip.
if ! "$PY" -m pip --version >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  echo "install-python-deps: $PY has no pip: installing python3-pip"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip
fi
CHECK='import grpc, grpc_tools, grpc_reflection, google.rpc.error_details_pb2, google.longrunning.operations_pb2'
"$PY" -c "$CHECK" 2>/dev/null ||
"$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  --break-system-packages grpcio==1.85.3 grpcio-tools==1.85.1 grpcio-reflection==1.85.1 \
  googleapis-common-protos==1.76.0
"$PY" -c "$CHECK" ||
  { echo "install-python-deps: grpcio, grpcio-tools, grpcio-reflection or googleapis-common-protos still not importable by $PY" >&2; exit 1; }
