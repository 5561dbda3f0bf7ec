"""A/B of tfssl's backbone layers against Keras's, the whole train step of a method, in one process.

    python bench/layers_ab.py [--methods ressl,simclr] [--backbone resnet18] [--only bn|conv] [--repeats 5] [--no-jit]

tfssl's layers: BatchNorm with the closed-form training gradient (``tfssl.backbones.batch_norm_train``) and Conv2D
with the kernel gradient summed over batch chunks (``conv2d_chunked_grad``). Both models get the same weights; the
"keras" one is traced while those layers run Keras's ``call`` / ``convolution_op`` (``--only`` swaps just one),
then the steps alternate A, B, A, B … on the same fixed views so both see the same machine load; medians are
compared. Predictions and results: bench/NOTES.md §4.
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from step_vs_torch import build_tfssl, make_batch  # noqa: E402
from tfssl import backbones  # noqa: E402


def traced_step(method, backbone, hidden, jit, batch, size, stock):
    """(model, train function, data, first-call s) of a fresh model, traced and compiled with Keras's
    implementation for the layers named in ``stock`` (a subset of {"bn", "conv"})."""
    model, _ = build_tfssl(method, backbone, hidden, jit, 0.06 * batch / 256)
    views, labels = make_batch(method, batch, size)
    data = {"views": tuple(tf.constant(v) for v in views), "label": tf.constant(labels)}
    ours = backbones.FusedBatchNormalization.call, backbones.ChunkedGradConv2D.convolution_op
    if "bn" in stock:
        backbones.FusedBatchNormalization.call = keras.layers.BatchNormalization.call
    if "conv" in stock:
        backbones.ChunkedGradConv2D.convolution_op = keras.layers.Conv2D.convolution_op
    try:
        model.make_train_function()
        fn = model.train_function
        start = time.perf_counter()
        float(fn([data])["loss"])                  # trace + compile with the implementations chosen above
        first = time.perf_counter() - start
    finally:
        backbones.FusedBatchNormalization.call, backbones.ChunkedGradConv2D.convolution_op = ours
    return model, fn, data, first


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="ressl")
    ap.add_argument("--backbone", default="resnet18", choices=sorted(backbones.SPECS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=("bn", "conv"), help="swap only this layer for Keras's (default: both)")
    ap.add_argument("--no-jit", dest="jit", action="store_false")
    a = ap.parse_args()
    hidden = 512 if a.backbone == "tiny" else 2048
    stock = {a.only} if a.only else {"bn", "conv"}
    print(f"layers A/B (Keras's {' + '.join(sorted(stock))} vs tfssl's): {a.backbone}, batch {a.batch}, {a.size} px, "
          f"XLA {'on' if a.jit else 'off'}, "
          f"{a.repeats} alternating timed steps each after one untimed; load {os.getloadavg()[0]:.2f}")
    rows = []
    for method in a.methods.split(","):
        runs = {}
        for name, swap in (("keras", stock), ("tfssl", set())):
            keras.utils.set_random_seed(0)
            runs[name] = traced_step(method, a.backbone, hidden, a.jit, a.batch, a.size, swap)
        times = {name: [] for name in runs}
        losses = {}
        for name, (_, fn, data, _) in runs.items():
            losses[name] = float(fn([data])["loss"])        # second step: the loss after one identical update
        for _ in range(a.repeats):
            for name, (_, fn, data, _) in runs.items():
                start = time.perf_counter()
                float(fn([data])["loss"])
                times[name].append(time.perf_counter() - start)
        k, t = statistics.median(times["keras"]), statistics.median(times["tfssl"])
        rows.append((method, k, t, runs["keras"][3], runs["tfssl"][3], losses))
        print(f"[{method}] keras " + " ".join(f"{x:.2f}" for x in times["keras"]) + " s; tfssl "
              + " ".join(f"{x:.2f}" for x in times["tfssl"]) + f" s; step-2 loss {losses['keras']:.5f} vs "
              f"{losses['tfssl']:.5f}", flush=True)
    print(f"\n{'method':<8}{'keras s':>11}{'tfssl s':>11}{'speed-up':>9}{'1st call keras/tfssl s':>24}")
    for method, k, t, fk, ft, _ in rows:
        print(f"{method:<8}{k:>11.3f}{t:>11.3f}{k / t:>8.2f}x{fk:>14.1f} / {ft:.1f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
