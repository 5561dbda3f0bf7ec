#!/usr/bin/env bash
# Installs everything tfssl needs on a Debian machine with Python 3.11: the Fashion-MNIST Debian package (when run
# as root and apt can reach it), the pinned Python stack and tfssl itself (editable, gives the `tfssl` command).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
      || echo "setup: could not install dataset-fashion-mnist; tfssl will try TFDS fashion_mnist instead"
  else
    echo "setup: not root; run 'apt-get install -y dataset-fashion-mnist' as root, or tfssl will try TFDS"
  fi
fi
python -m pip install -q --disable-pip-version-check -r requirements.txt
python -m pip install -q --disable-pip-version-check --no-deps -r requirements-test.txt
python -m pip install -q --disable-pip-version-check --no-deps -e .
echo "setup: done ($(python -c 'import tensorflow as tf, keras; print("TensorFlow", tf.__version__, "/ Keras", keras.__version__)' 2>/dev/null))"
