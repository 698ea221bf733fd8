#!/usr/bin/env bash
# Wheels of wa's dependencies that a GPU machine without network lacks (its image holds jax, flax, optax, orbax,
# tensorstore, transformers, chex, scikit-learn, pandas, pyarrow, matplotlib, safetensors, pytest and the rest),
# downloaded here into .whl/ (git-ignored) to travel with the working tree, for Python 3.12 on x86-64:
#
#   bash launch/device_wheels.sh
#   # then, on the device machine (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 experiments/device_check.py --out $OUT
#
# jraph (the graph learner), ml_collections (every config), gguf (llama.cpp's reader); the device check needs no
# more. Pinned to the versions launch/setup.sh installs here.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl jraph==0.0.6.dev0 ml_collections==1.1.0 gguf==0.19.0
ls -la .whl
