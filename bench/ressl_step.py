"""ReSSL train-step throughput (images/s): EMA, teacher forward, student forward/backward, loss, optimizer, enqueue.

    python bench/ressl_step.py [--backbones tiny,resnet18] [--batch 128] [--size 32] [--steps 5]

Views are pre-made tensors (the input pipeline is measured by augment_throughput.py), so this is the step alone.
Each configuration is measured after a warm-up (tracing / XLA compilation) as the median of --repeats runs, with and
without XLA jit_compile, side by side in one run.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfssl import config, methods, optim  # noqa: E402


def measure(backbone, batch, size, steps, repeats, jit):
    cfg = config.from_dict({"method": {"name": "ressl", "queue_size": 4096},
                            "model": {"backbone": backbone, "cifar_stem": True}})
    model = methods.build(cfg, num_classes=10, total_steps=1000)
    model.compile(optim.SGD(0.06, momentum=0.9, weight_decay=5e-4), jit_compile=jit)
    views = tuple(np.random.default_rng(i).uniform(0, 1, (batch, size, size, 3)).astype("float32") for i in range(2))
    ds = tf.data.Dataset.from_tensors({"views": views, "label": np.zeros(batch, "int32")}).repeat()
    model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        rates.append(steps * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="tiny,resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    print(f"ReSSL train step, batch {a.batch}, {a.size} px, CIFAR stem, {os.cpu_count()} CPU cores, TF {tf.__version__}")
    print(f"{'backbone':<12}{'img/s (no XLA)':>16}{'img/s (XLA)':>14}")
    for backbone in a.backbones.split(","):
        plain = measure(backbone, a.batch, a.size, a.steps, a.repeats, False)
        xla = measure(backbone, a.batch, a.size, a.steps, a.repeats, True)
        print(f"{backbone:<12}{plain:>16.1f}{xla:>14.1f}")


if __name__ == "__main__":
    main()
