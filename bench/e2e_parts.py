"""Where an end-to-end epoch goes (bench/NOTES.md §7): a method's Fashion-MNIST recipe split into its parts, in one
process, variants alternated so they see the same machine.

    python bench/e2e_parts.py [--method ressl] [--steps 20] [--repeats 2] [--variants auto,stock,float32,graph,xla]
                              [--set key=value ...]

Parts, each in images/s (one image = one source image with all its views):

* ``pipeline`` — the recipe's input pipeline alone (``model.make_pipeline``: shuffle, batch, views in tf.data),
  iterated ``--steps`` batches;
* ``step`` — ``model.fit`` on one pre-made batch repeated (the train step alone: no views, no input pipeline);
* ``fit`` — ``model.fit`` on the real pipeline (what ``tfssl pretrain`` runs; the end-to-end figure).

Variants change one thing of the device plan (tfssl/devices.py) from ``auto``: ``stock`` (Keras's layers instead of
tfssl's tuned kernels), ``float32`` / ``bf16`` (precision), ``graph`` / ``xla`` (``jit_compile``), ``fused_bn`` /
``xla_bn`` (the graph step's BatchNorm kernel, ``tfssl.devices.CPU_GRAPH_BN``, on every CPU kind). Each variant
builds its own model; the first epoch of each part is untimed (tracing, XLA, oneDNN primitives). Environment caps
(``ONEDNN_MAX_CPU_ISA`` …) apply as in bench/end_to_end.py (``--emulate avx2`` re-runs this script under them).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
EMULATE = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}}
VARIANTS = {"auto": [], "stock": ["train.kernels=stock"], "tuned": ["train.kernels=tuned"],
            "float32": ["train.precision=float32"], "bf16": ["train.precision=mixed_bfloat16"],
            "graph": ["train.jit_compile=false"], "xla": ["train.jit_compile=true"], "fused_bn": [],
            "xla_bn": []}
# variants that change a device-plan table instead of a recipe key: the graph step's BatchNorm kernel on every CPU kind
GRAPH_BN = {"fused_bn": "fused_v3", "xla_bn": "xla_forward"}


def plan_table(variant):
    """The ``tfssl.devices.CPU_GRAPH_BN`` a variant's step is traced with (a context manager)."""
    import contextlib
    from tfssl import devices

    @contextlib.contextmanager
    def patched():
        saved = dict(devices.CPU_GRAPH_BN)
        if variant in GRAPH_BN:
            devices.CPU_GRAPH_BN.update({k: (GRAPH_BN[variant], variant) for k in saved})
        try:
            yield
        finally:
            devices.CPU_GRAPH_BN.update(saved)
    return patched()


def build(method, sets):
    """(cfg, model, pipeline dataset, plan) as ``tfssl pretrain`` builds them (one replica)."""
    import keras
    import tensorflow as tf
    from tfssl import config, data, distribute, methods, pipeline
    from tfssl.optim import SGD, build_optimizer
    from tfssl.train import plan_steps
    cfg = config.load(f"{method}_fashion_mnist", sets)
    source = data.load_source(cfg.data)
    steps = plan_steps(cfg, source.num_train)
    views = methods.views_for(cfg, steps)
    plan = distribute.train_plan(cfg.train.jit_compile, cfg.train.kernels, cfg.train.precision,
                                 views=cfg.train.views_parallelism, autotune=cfg.train.data_autotune)
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(plan.precision)
    try:
        model = methods.build(cfg, source.num_classes, source.mean, source.std, steps * cfg.train.epochs,
                              steps_per_epoch=steps)
        model.compile(build_optimizer(cfg.train, steps * cfg.train.epochs, steps),
                      probe_optimizer=SGD(cfg.train.probe_lr, momentum=0.9, name="probe_sgd"), jit_compile=plan.jit)
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    batches = model.make_pipeline(source, views, cfg, steps, epoch, views_parallelism=plan.views_parallelism)
    batches = pipeline.with_autotune(batches, plan.data_autotune)
    return cfg, model, batches, plan


def timed_fit(model, ds, steps):
    """images/s of the second of two ``steps``-step epochs of ``model.fit(ds)``."""
    import keras
    marks = []

    class Mark(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            marks.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            marks.append(time.perf_counter())

    model.fit(ds, epochs=2, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[Mark()])
    return marks[3] - marks[2]


def op_times(logdir):
    """{op type: thread-seconds} from the profiler's XSpace under ``logdir`` (TF executor events ``name:Type``)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from xspace import event_seconds
    return event_seconds(logdir, lambda n: n.rsplit(":", 1)[1] if ":" in n and not n.startswith(("Iterator",
                                                                                                   "Memory")) else None)


def profile(variant, model, batches, one, steps, top):
    """Thread-seconds per step by op type of the step alone (after two untimed epochs)."""
    import tempfile
    import tensorflow as tf
    timed_fit(model, one, steps)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        model.fit(one, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        wall = (time.perf_counter() - start) / steps
        tf.profiler.experimental.stop()
        totals = op_times(logdir)
    print(f"\n{variant}: {wall * 1e3:.0f} ms per step (wall, profiled), ops {sum(totals.values()) / steps:.3f} "
          f"thread-s per step")
    for name, seconds in totals.most_common(top):
        print(f"{seconds / steps * 1e3:10.1f} ms  {name}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="ressl")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default="auto,stock,float32")
    p.add_argument("--parts", default="pipeline,step,fit")
    p.add_argument("--emulate", choices=sorted(EMULATE), default=None)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="instead: profile the step alone of each variant, print its TOP op types by thread time")
    args = p.parse_args()
    if args.emulate and not all(os.environ.get(k) == v for k, v in EMULATE[args.emulate].items()):
        os.environ.update(EMULATE[args.emulate])
        os.execv(sys.executable, [sys.executable] + sys.argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from tfssl.devices import detect
    variants, parts = args.variants.split(","), args.parts.split(",")
    base = [f"train.steps_per_epoch={args.steps}", "train.epochs=2", "data.limit=" + str(args.steps * 512),
            "data.test_limit=256"] + args.set
    print(f"{detect().describe()}; {args.method}, {args.steps} steps per timed epoch, variants {variants}", flush=True)
    built = {}
    for v in variants:
        with plan_table(v):
            cfg, model, batches, plan = build(args.method, base + VARIANTS[v])
        batch = cfg.train.batch_size
        one = batches.take(1).cache().repeat()
        built[v] = (model, batches, one, batch)
        print(f"  {v}: {plan.describe()}", flush=True)
    if args.profile:
        for v in variants:
            with plan_table(v):
                profile(v, *built[v][:3], args.steps, args.profile)
        return
    rates = {(v, part): [] for v in variants for part in parts}
    for r in range(args.repeats):
        for v in variants:
            model, batches, one, batch = built[v]
            for part in parts:
                if part == "pipeline":
                    it = iter(batches.repeat())
                    for _ in range(3):
                        next(it)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, next(it))
                    seconds = time.perf_counter() - start
                else:
                    with plan_table(v):
                        seconds = timed_fit(model, one if part == "step" else batches.repeat(), args.steps)
                rates[(v, part)].append(args.steps * batch / seconds)
        print(f"  repeat {r + 1}: " + ", ".join(f"{v}/{part} {rates[(v, part)][-1]:.0f}" for v in variants
                                                for part in parts), flush=True)
    print(f"\nimages/s, median of {args.repeats} ({args.method}, batch {batch}):")
    print("variant    " + "".join(f"{part:>10}" for part in parts))
    for v in variants:
        print(f"{v:<10} " + "".join(f"{statistics.median(rates[(v, part)]):10.0f}" for part in parts))


if __name__ == "__main__":
    main()
