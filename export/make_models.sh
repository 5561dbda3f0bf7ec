#!/usr/bin/env bash
# The zoo's shipped backbones (export/models/<method>_fashion_mnist): each method's Fashion-MNIST recipe
# (configs/<method>_fashion_mnist.yaml) at half width — model.width=0.5: 16-32-64-128 channels, 128-d features,
# 0.31 M parameters, ≈ 1.2 MB per format, so every file stays under 2 MB — trained on the full split (60 000
# images) for the epochs below (≈ 6-9 training minutes each on 2 cores with bf16), evaluated offline (kNN, linear
# probe), exported in the three formats with their parity check, and listed in export/zoo.json.
#   bash export/make_models.sh                 # all five;  METHODS="ressl wcl" bash export/make_models.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/zoo}
declare -A EPOCHS=([ressl]=10 [mocov2]=10 [simclr]=6 [wcl]=5 [csml]=2)
for m in ${METHODS:-ressl wcl csml simclr mocov2}; do
  python bench/quality.py --methods "$m" --out "$RUNS" --set model.width=0.5 --set "train.epochs=${EPOCHS[$m]}" \
    --set train.knn_every=0 --protocols knn,linear --subjects trained   # online kNN after the last epoch only
  tfssl export --workdir "$RUNS/$m" --out "export/models/${m}_fashion_mnist" --overwrite
  tfssl zoo add "export/models/${m}_fashion_mnist" --name "${m}_fashion_mnist" --replace
done
