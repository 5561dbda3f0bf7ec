"""Does the input pipeline keep up with the step? Views/s of each recipe's pretraining pipeline vs the step's demand.

    python bench/pipeline.py [--recipes ressl_fashion_mnist,wcl_cifar10,...] [--batch 64] [--batches 12]
    python bench/pipeline.py --recipes ressl_imagenet,wcl_imagenet,csml_imagenet --folder synthetic --no-step

For every recipe: the real pretraining pipeline (``model.make_pipeline``: epoch pipeline with the recipe's views,
CsMl's pair pipeline, multi-crop) drawn for ``--batches`` batches after a warm-up batch (images/s and views/s), and
the recipe's train step (its backbone, heads, XLA setting) timed on one of those batches through Keras's compiled
train function (median of 3 after a first call). ``headroom`` = pipeline images/s ÷ step images/s: above 1 the
pipeline never starves the step. Offline, recipes of other datasets read Fashion-MNIST images resized to the
recipe's image size (decode cost aside, the views cost the same); with ``--folder DIR`` (or ``synthetic``: 1024
JPEGs of 300–500 px written to a temp directory) the ImageNet recipes read that image folder instead, decoding and
cropping the originals at 224 px as they would on a GPU host. ``--no-step`` times the pipeline alone. Both run on
the same cores here; on a GPU host the pipeline has the CPU to itself and the step is far faster, so the table is
also the CPU budget per image there. The script uses only the library's public pieces (``data.load_source``,
``methods.views_for/build``, ``model.make_pipeline``), so it also runs against an older checkout (copy it there).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

from tfssl import config, data, methods  # noqa: E402
from tfssl.optim import SGD, build_optimizer  # noqa: E402

DEFAULT = ("ressl_fashion_mnist,mocov2_fashion_mnist,simclr_fashion_mnist,wcl_fashion_mnist,csml_fashion_mnist,"
           "ressl_cifar10,wcl_cifar10,ressl_stl10")


def measure(recipe, batch, batches, folder=None, step=True):
    if folder and "imagenet" in recipe:
        cfg = config.load(recipe, [f"train.batch_size={batch}", "data.name=folder", f"data.path={folder}",
                                   "data.limit=null", "data.test_path=null"])
    else:
        cfg = config.load(recipe, [f"train.batch_size={batch}", "data.name=fashion_mnist", "data.limit=4096",
                                   "data.test_limit=64", "data.path=null"])
        cfg.data.channels = 3
    source = data.load_source(cfg.data)
    steps = source.num_train // batch
    views = methods.views_for(cfg, steps)
    model = methods.build(cfg, source.num_classes, source.mean, source.std, steps, steps_per_epoch=steps)
    model.compile(build_optimizer(cfg.train, steps, steps), probe_optimizer=SGD(0.1, momentum=0.9),
                  jit_compile=cfg.train.jit_compile)
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = model.make_pipeline(source, views, cfg, steps, epoch)
    batches = max(1, min(batches, steps - 1))       # one epoch of the source: a warm-up batch and these
    it = iter(ds)
    first = next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    pipe = batches * batch / (time.perf_counter() - start)
    n_views = sum(1 for v in first["views"] if v.shape.rank == 4) if "views" in first else views.count
    if not step:
        return dict(recipe=recipe, size=cfg.augment.size, views=n_views, backbone=cfg.model.backbone,
                    jit=cfg.train.jit_compile, pipe=pipe, step=None)
    model.make_train_function()
    fn = model.train_function
    fn([first])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        float(fn([first])["loss"])
        times.append(time.perf_counter() - t0)
    step = batch / statistics.median(times)
    return dict(recipe=recipe, size=cfg.augment.size, views=n_views, backbone=cfg.model.backbone,
                jit=cfg.train.jit_compile, pipe=pipe, step=step)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=DEFAULT)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--folder", default=None, help="image folder for the ImageNet recipes, or 'synthetic'")
    p.add_argument("--no-step", action="store_true", help="time the pipeline only")
    args = p.parse_args()
    folder = args.folder
    if folder == "synthetic":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from accelerators import synthetic_folder
        folder = synthetic_folder(1024)
    rows = []
    for recipe in args.recipes.split(","):
        rows.append(measure(recipe, args.batch, args.batches, folder, not args.no_step))
        r = rows[-1]
        print(f"  {recipe}: pipeline {r['pipe']:.0f} img/s" + (f", step {r['step']:.1f} img/s" if r["step"] else ""),
              flush=True)
    print(f"\nbatch {args.batch}, {os.cpu_count()} cores shared by pipeline and step\n")
    print("| recipe | px | views/img | backbone | XLA | pipeline img/s | pipeline views/s | step img/s | headroom |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        step = "—" if r["step"] is None else f"{r['step']:.1f}"
        headroom = "—" if r["step"] is None else f"{r['pipe'] / r['step']:.1f}x"
        print(f"| {r['recipe']} | {r['size']} | {r['views']} | {r['backbone']} | {r['jit']} | {r['pipe']:.0f} | "
              f"{r['pipe'] * r['views']:.0f} | {step} | {headroom} |")


if __name__ == "__main__":
    main()
