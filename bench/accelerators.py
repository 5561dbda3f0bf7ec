"""On paper, for GPUs and TPUs: per recipe, the FLOPs of a training step (bench/flops.py), the images/s a V100, an A100
and a TPU v4 chip would need to be compute-bound at their published peak, and the input pipeline's measured images/s
per host core on this CPU at the recipe's view size — where the bottleneck will be before renting hardware.

    python bench/accelerators.py [--recipes ressl_imagenet,...] [--folder DIR] [--seconds 15]

Peaks (dense, published): V100 SXM2 125 TFLOP/s fp16 tensor cores (15.7 fp32); A100 SXM4 312 TFLOP/s bf16/fp16
tensor cores (19.5 fp32); TPU v4 275 TFLOP/s bf16 per chip. "compute-bound images/s" = peak / FLOPs per image of
one step (student forward + backward, teacher forward, heads, loss): a step cannot run faster than that, and real
steps reach 30–60 % of peak. The pipeline column is the recipe's real pretraining pipeline (views made in tf.data,
crops of the originals for image folders) on this machine's cores, divided by the cores it used; a host feeding one
accelerator needs (compute-bound images/s × utilisation) / (pipeline images/s per core) cores. Offline, recipes of
other datasets read Fashion-MNIST images resized to the recipe's image size, and ImageNet recipes read ``--folder``
(JPEGs of any size; default: synthetic 300–500 px images written to a temp directory).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flops  # noqa: E402

PEAKS = {"V100 fp16": 125e12, "A100 bf16": 312e12, "TPU v4 bf16": 275e12}
DEFAULT = ("ressl_fashion_mnist,wcl_fashion_mnist,csml_fashion_mnist,ressl_cifar10,wcl_cifar10,ressl_stl10,"
           "ressl_imagenet,wcl_imagenet,csml_imagenet")


def synthetic_folder(n=256):
    import numpy as np
    from PIL import Image
    root = tempfile.mkdtemp(prefix="tfssl-folder-")
    rng = np.random.default_rng(0)
    for c in range(4):
        os.makedirs(os.path.join(root, f"c{c}"))
        for i in range(n // 4):
            h, w = int(rng.integers(300, 500)), int(rng.integers(300, 500))
            base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
            Image.fromarray(base).resize((w, h), Image.BILINEAR).save(os.path.join(root, f"c{c}", f"{i}.jpg"),
                                                                       quality=90)
    return root


def per_image_flops(cfg):
    m = type(cfg.method).method_name
    kw = dict(backbone=cfg.model.backbone, size=cfg.augment.size, batch=64, hidden=cfg.model.projector_hidden,
              dim=cfg.model.projector_dim, queue=getattr(cfg.method, "queue_size", 4096), width=cfg.model.width,
              cifar_stem=cfg.model.cifar_stem)
    return flops.step_flops(m, **kw).total / 64


def pipeline_rate(cfg, seconds):
    """Images/s of the recipe's pretraining pipeline on this machine (all cores), after one warm-up batch."""
    from tfssl import data, methods
    source = data.load_source(cfg.data)
    batch = min(cfg.train.batch_size, 64)
    cfg.train.batch_size = batch
    steps = max(1, source.num_train // batch)
    views = methods.views_for(cfg, steps)
    model = methods.build(cfg, source.num_classes, source.mean, source.std, steps, steps_per_epoch=steps)
    import tensorflow as tf
    it = iter(model.make_pipeline(source, views, cfg, steps, tf.Variable(0, dtype=tf.int64)))
    next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds and n < steps - 1:
        next(it)
        n += 1
    return n * batch / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default=DEFAULT)
    p.add_argument("--folder", default=None, help="image folder for the ImageNet recipes (default: synthetic)")
    p.add_argument("--seconds", type=float, default=15.0, help="pipeline timing per recipe")
    args = p.parse_args()
    from tfssl import config
    from tfssl.devices import cpu_flags
    folder = args.folder
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = []
    for recipe in args.recipes.split(","):
        cfg = config.load(recipe)
        images = per_image_flops(cfg)
        if recipe.endswith(("imagenet", "imagenet_multicrop")):
            folder = folder or synthetic_folder()
            sets = ["data.name=folder", f"data.path={folder}", "data.test_path=null", "data.limit=null"]
        elif not recipe.endswith("fashion_mnist"):
            sets = ["data.name=fashion_mnist", "data.path=null", "data.limit=4096", "data.channels=3",
                    "data.pretrain_split=train", "data.eval_split=train"]
        else:
            sets = ["data.limit=4096"]
        rate = pipeline_rate(config.load(recipe, sets + ["data.test_limit=64"]), args.seconds)
        rows.append((recipe, cfg.augment.size, cfg.model.backbone, images, rate / cores))
        print(f"  {recipe}: {images / 1e9:.2f} GFLOP/image, pipeline {rate:.0f} img/s on {cores} cores", flush=True)
    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags())
    print(f"\nCPU flags: {flags}; {cores} cores; pipeline per core = measured / {cores}\n")
    head = " | ".join(f"{k} img/s" for k in PEAKS)
    print(f"| recipe | px | backbone | GFLOP/image/step | {head} | pipeline img/s per core | cores per A100 at 50 % |")
    print("|---|---|---|---|" + "---|" * len(PEAKS) + "---|---|")
    for recipe, size, backbone, f, per_core in rows:
        bound = [peak / f for peak in PEAKS.values()]
        need = 0.5 * PEAKS["A100 bf16"] / f / per_core
        print(f"| {recipe} | {size} | {backbone} | {f / 1e9:.2f} | " + " | ".join(f"{b:,.0f}" for b in bound) +
              f" | {per_core:,.0f} | {need:,.0f} |")


if __name__ == "__main__":
    main()
