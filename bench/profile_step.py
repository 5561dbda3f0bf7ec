"""Where an XLA-compiled train step spends its time, per HLO instruction category (XLA:CPU thunk traces).

    python bench/profile_step.py [--method ressl] [--backbone resnet18] [--batch 128] [--steps 2] [--top 15]

Builds the method as bench/step_vs_torch.py does, compiles its step with XLA, then records ``--steps`` steps with
the TensorFlow profiler while XLA emits a trace event per thunk (``--xla_cpu_enable_xprof_traceme``, set here
before TensorFlow starts). Prints thread-seconds per step by category (the instruction name without its number:
``transpose_copy_fusion``, ``wrapped_reduce-window``, ``convolution``…) and the top instructions. Thread time over
both cores: divide by the number of busy threads for wall time. Convolutions run as Eigen tasks that the trace
does not name, so their time is the step time less what is listed. This is how bench/NOTES.md §4 found the
transposes and reduce-window loops.
"""
import argparse
import collections
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

HLO_NAME = re.compile(r"^[a-z_\-]+(\.\d+)?$")


def thunk_times(logdir, steps):
    """{instruction name: thread-seconds per step} from the profiler's XSpace under ``logdir``."""
    from xspace import event_seconds
    totals = event_seconds(logdir, lambda n: n if HLO_NAME.match(n) and n != "one_step_on_data" else None)
    return collections.Counter({name: seconds / steps for name, seconds in totals.items()})


def main():
    from step_vs_torch import METHODS, build_tfssl, make_batch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="ressl", choices=METHODS)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    import tensorflow as tf
    model, _ = build_tfssl(a.method, a.backbone, 512 if a.backbone == "tiny" else 2048, True, 0.06 * a.batch / 256)
    views, labels = make_batch(a.method, a.batch, a.size)
    data = {"views": tuple(tf.constant(v) for v in views), "label": tf.constant(labels)}
    model.make_train_function()
    fn = model.train_function
    float(fn([data])["loss"])                     # trace + compile, outside the profile
    float(fn([data])["loss"])
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        for _ in range(a.steps):
            float(fn([data])["loss"])
        wall = (time.perf_counter() - start) / a.steps
        tf.profiler.experimental.stop()
        totals = thunk_times(logdir, a.steps)
    categories = collections.Counter()
    for name, seconds in totals.items():
        categories[re.sub(r"\.\d+$", "", name)] += seconds
    print(f"{a.method}, {a.backbone}, batch {a.batch}, {a.size} px: {wall:.2f} s per step (wall, profiled); "
          f"traced thunks {sum(totals.values()):.2f} thread-s per step")
    print(f"{'thread-s/step':>14}  category")
    for name, seconds in categories.most_common(a.top):
        print(f"{seconds:>14.3f}  {name}")
    print(f"{'thread-s/step':>14}  instruction")
    for name, seconds in totals.most_common(a.top):
        print(f"{seconds:>14.3f}  {name}")


if __name__ == "__main__":
    main()
