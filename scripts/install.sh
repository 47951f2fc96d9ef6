#!/usr/bin/env bash
# Installs everything lightning_sparse needs on a fresh Debian machine: Fashion-MNIST from Debian's
# dataset-fashion-mnist package, torch 2.13.0 (CPU build; pinned so pip never pulls another one), and this
# package with its dev extras. Used by the README's first command and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[dev]"
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
