#!/usr/bin/env bash
# Everything needed to run the test suite on a fresh machine: set-up, build, pytest.
# Extra arguments go to pytest (e.g. tools/test.sh -k gqa).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/setup.sh matplotlib  # matplotlib: the benchmark plot, written by a test under a fake GPU
python3 -m pytest -q -ra "$@"
