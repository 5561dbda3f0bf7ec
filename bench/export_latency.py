"""Inference latency of exported backbones: ONNX Runtime vs the TF SavedModel, side by side in one run (issue #7).

    python bench/export_latency.py [--models resnet18,resnet50] [--sizes 32,224] [--batches 1,64]
                                   [--repeats 20] [--budget 10]

Each (backbone, size) is exported once with ``tfssl.export.export_backbone`` (SavedModel + ONNX, parity-checked) into
a temp directory: CIFAR stem up to 64 px, ImageNet stem (7×7/2 conv + max-pool) above, random weights (latency does
not depend on them). Then the same float32 batch goes through the reloaded SavedModel's ``features`` function and an
ONNX Runtime CPU session: one warm-up call, then up to --repeats timed calls or --budget seconds per engine and case,
whichever ends first; the table shows the median milliseconds per batch and images/s. Both engines use their default
thread pools on all cores. Numbers are machine-dependent; they are printed, never asserted in tests.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfssl.backbones import build_backbone  # noqa: E402
from tfssl.export import export_backbone  # noqa: E402


def timed(fn, repeats, budget):
    """Median seconds of ``fn()`` after one warm-up call: up to ``repeats`` calls or ``budget`` seconds."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < repeats and (len(times) < 2 or time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--sizes", default="32,224")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per engine and case (at most)")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds per engine and case (at least 2 calls)")
    args = ap.parse_args()
    import onnxruntime as ort

    print(f"TF {tf.__version__}, ONNX Runtime {ort.__version__}, {os.cpu_count()} CPU cores")
    header = (f"{'backbone':<10} {'size':>5} {'batch':>5} {'TF SavedModel ms':>17} {'ORT ms':>9} "
              f"{'TF img/s':>9} {'ORT img/s':>10} {'ORT speed-up':>12} {'calls':>7}")
    print(header + "\n" + "-" * len(header))
    for name in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "export")
                export_backbone(build_backbone(name, cifar_stem=size <= 64), out, formats=("savedmodel", "onnx"),
                                input_size=size)
                loaded = tf.saved_model.load(os.path.join(out, "saved_model"))
                session = ort.InferenceSession(os.path.join(out, "backbone.onnx"), providers=["CPUExecutionProvider"])
                for batch in map(int, args.batches.split(",")):
                    x = np.random.default_rng(0).uniform(0, 1, (batch, size, size, 3)).astype(np.float32)
                    xt = tf.constant(x)
                    tf_s, tf_n = timed(lambda: loaded.features(xt).numpy(), args.repeats, args.budget)
                    ort_s, ort_n = timed(lambda: session.run(["features"], {"images": x}), args.repeats, args.budget)
                    print(f"{name:<10} {size:>5} {batch:>5} {1e3 * tf_s:>17.2f} {1e3 * ort_s:>9.2f} "
                          f"{batch / tf_s:>9.1f} {batch / ort_s:>10.1f} {tf_s / ort_s:>11.2f}x {tf_n:>3}/{ort_n:<3}",
                          flush=True)


if __name__ == "__main__":
    main()
