#!/usr/bin/env bash
# Install paligemma-ref for development: the package (editable), the test tools, and the keras-hub oracle on the
# JAX CPU backend without TensorFlow. Idempotent. Used by README.md's test command and so by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test,peers]"
python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-peers-nodeps.txt
