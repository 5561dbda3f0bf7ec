"""Augmentation throughput (images/s) of each view recipe, in the tf.data pipeline vs on the device (tf.function).

    python bench/augment_throughput.py [--batch 256] [--size 32] [--preset cifar] [--seconds 5]

One "image" = one source image turned into all the views of the recipe. Pipeline: batched map with AUTOTUNE over
an in-memory dataset (what `augment.on_device: false` runs); on-device: the same layers in a jit-less tf.function
(what `augment.on_device: true` runs inside train_step). Both placements are measured in one run, side by side.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfssl import views as V  # noqa: E402

RECIPES = {"strong x2 (MoCo v2)": dict(recipes=("strong", "strong")),
           "strong+weak (ReSSL)": dict(recipes=("strong", "weak")),
           "simclr x2 (SimCLR/WCL)": dict(recipes=("simclr", "simclr")),
           "byol1+byol2": dict(recipes=("byol1", "byol2")),
           "ReSSL + 4 small crops": dict(recipes=("strong", "weak"), small_crops=4)}


def timed(fn, seconds):
    fn()  # warm-up / trace
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += fn()
    return n / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--preset", default="cifar")
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    images = np.random.default_rng(0).integers(0, 255, (a.batch * 8, a.size, a.size, 3)).astype("uint8")
    print(f"augmentation throughput, preset {a.preset}, {a.size} px, batch {a.batch}, "
          f"{os.cpu_count()} CPU cores, TF {tf.__version__}")
    print(f"{'recipe':<26}{'pipeline img/s':>16}{'on-device img/s':>17}")
    for name, spec in RECIPES.items():
        views = V.Views(preset=a.preset, size=a.size, small_size=a.size // 2, **spec)
        ds = tf.data.Dataset.from_tensor_slices(images).repeat().batch(a.batch, drop_remainder=True)
        it = iter(ds.map(views, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))

        def pipeline():
            next(it)
            return a.batch
        batch = tf.constant(images[:a.batch])
        device_fn = tf.function(views)

        def device():
            for v in device_fn(batch):
                v.numpy()
            return a.batch
        print(f"{name:<26}{timed(pipeline, a.seconds):>16.0f}{timed(device, a.seconds):>17.0f}")


if __name__ == "__main__":
    main()
