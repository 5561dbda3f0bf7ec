"""Weak-label quality of a WCL run: components, mean size and precision at initialisation vs the trained checkpoint,
on the same training batches (the two views of the run's recipe; labels read for monitoring only).

    python bench/wcl_weak_labels.py --workdir runs/wcl_fmnist --batches 10
"""
import argparse
import os

import keras
import numpy as np
import tensorflow as tf

from tfssl import config, data, methods, pipeline
from tfssl.losses import component_stats, weak_labels
from tfssl.methods.base import normalize


def stats(model, batches):
    rows = []
    for batch in batches:
        per_view = []
        for view in batch["views"][:2]:
            h = normalize(model.graph_head(model.backbone(view, training=True), training=True))
            per_view.append([float(x) for x in component_stats(weak_labels(h), batch["label"])])
        rows.append(np.mean(per_view, axis=0))
    return np.mean(rows, axis=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--batches", type=int, default=10)
    a = ap.parse_args()
    cfg = config.load(os.path.join(a.workdir, "config.yaml"))
    keras.utils.set_random_seed(cfg.train.seed)
    source = data.load_source(cfg.data)
    views = methods.views_for(cfg)   # the main (post warm-up) recipe
    batches = list(pipeline.train_pipeline(source.train, cfg.train.batch_size, views, seed=1).take(a.batches))
    model = methods.build(cfg, source.num_classes, source.mean, source.std)
    print(f"{a.batches} batches of {cfg.train.batch_size}, both views")
    print(f"{'weights':<12} {'components':>11} {'mean size':>10} {'precision':>10}")
    print(f"{'init':<12} " + " ".join(f"{x:>10.3f}" for x in stats(model, batches)))
    model.load_weights(os.path.join(a.workdir, "checkpoints", "last.weights.h5"))
    print(f"{'trained':<12} " + " ".join(f"{x:>10.3f}" for x in stats(model, batches)))
    rng = np.random.default_rng(0)
    chance = []
    for batch in batches:   # same partition sizes, random assignment: what precision is by chance
        labels = np.asarray(weak_labels(normalize(model.graph_head(model.backbone(batch["views"][0])))))
        chance.append(float(component_stats(tf.constant(rng.permutation(labels)), batch["label"])[2]))
    print(f"{'shuffled':<12} {'':>10} {'':>10} {np.mean(chance):>10.3f}   (trained partition, labels permuted)")


if __name__ == "__main__":
    main()
