"""Full training step of each tfssl method against a PyTorch implementation of the same step, on this CPU.

    python bench/step_vs_torch.py [--method ressl] [--quick] [--batch 128] [--size 32] [--backbone resnet18]
                                  [--hidden 2048] [--jit | --no-jit] [--warmup 0] [--repeats 3] [--threads N]
                                  [--torch-channels-last]

What is timed: one whole training step on a fixed pre-made batch (no input pipeline): EMA update of the teacher,
teacher forward, student forward/backward, loss, SGD-momentum update, queue update, online linear probe. tfssl runs
its own ``model.train_step`` through Keras's compiled train function (``make_train_function``; XLA unless
``--no-jit``); PyTorch runs the same step written below (eager mode, same architecture, heads, views, losses and
optimizer), initialised with tfssl's weights and queue. Both frameworks get the same number of threads.

Protocol per method: build both, check that the two losses agree on the same weights and images (PyTorch then
switched to TF's ``same`` padding; timing uses PyTorch's usual symmetric padding), one untimed call per framework
(tracing + XLA compilation, reported separately), ``--warmup`` untimed steps each, then ``--repeats`` timed steps
*alternating* tfssl / PyTorch so both see the same machine load; the median step time gives img/s (one image = one
source image with all its views). FLOPs are analytic (bench/flops.py; cross-checked with TF's profiler). The
roofline (issue #9: "the conv roofline measured with TF") is measured in the run by bench/roofline.py: every
convolution of the step at its own shape, timed alone in TF (forward for teacher passes, forward + both backward
convolutions for student passes, the faster of TF graph and XLA per layer); ``% roof`` = step img/s / the img/s the
step would reach if only its convolutions took time. ``% peak`` compares the achieved GFLOP/s with the machine's
best single convolution (a large 3×3 forward, the highest GFLOP/s measured in the run). See bench/README.md.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# PyTorch's OpenMP threads spin-wait by default; on a shared (oversubscribed) CPU a spinning or pre-empted thread
# stalls every parallel region (measured here: tiny ResNet step 4 s spinning vs 0.1 s passive). TF's Eigen pool
# steals work and does not need this. Must be set before torch is imported; an explicit setting is respected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import flops  # noqa: E402
import roofline as step_roofline  # noqa: E402
from torch_reference import copy_keras_weights, torch_modules  # noqa: E402

METHODS = ("ressl", "simclr", "mocov2", "wcl", "csml")


# ===================================================================================================== tfssl
def build_tfssl(method, backbone, hidden, jit, lr):
    import keras
    from tfssl import config, methods, optim
    keras.utils.set_random_seed(0)
    method_cfg = {"name": method}
    if method in ("ressl", "mocov2", "csml"):
        method_cfg["queue_size"] = 4096
    cfg = config.from_dict({"method": method_cfg,
                            "model": {"backbone": backbone, "cifar_stem": True, "projector_hidden": hidden,
                                      "projector_dim": 128, "projector_bn": method == "simclr"}})
    model = methods.build(cfg, num_classes=10, total_steps=1000)
    model.compile(optim.SGD(lr, momentum=0.9, weight_decay=5e-4), jit_compile=jit)
    return model, cfg.method


def hyper(method, params):
    """The loss hyper-parameters of tfssl's method config that the PyTorch step needs."""
    hp = {k: getattr(params, k) for k in ("temperature", "graph_temperature", "student_temperature",
                                          "teacher_temperature", "momentum") if hasattr(params, k)}
    if method == "csml":           # cross-sample weights are off before cross_warmup_epochs (always, here)
        hp.update(w0=1.0, w1=0.0)
    return hp


def make_batch(method, batch, size, seed=0):
    """Fixed views (NHWC float32 in [0,1]) and labels: 2 views, CsMl's (q_i, k_i, q_j, k_j, q_mix, λ′)."""
    rng = np.random.default_rng(seed)
    n = 5 if method == "csml" else 2
    views = [rng.uniform(0, 1, (batch, size, size, 3)).astype("float32") for _ in range(n)]
    if method == "csml":
        views.append(rng.uniform(0.3, 1.0, batch).astype("float32"))
    return views, rng.integers(0, 10, batch).astype("int32")


def to_torch(views, channels_last):
    import torch
    out = []
    for v in views:
        t = torch.from_numpy(v)
        if t.dim() == 4:
            t = t.permute(0, 3, 1, 2)
            t = t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()
        out.append(t)
    return out


# ===================================================================================================== peak conv
def peak_conv(batch, size, channels, reps):
    """GFLOP/s of a 3×3 'same' conv forward on [batch, size, size, channels] → channels, best of ``reps``, in TF
    (oneDNN graph op), TF with XLA, PyTorch NCHW and PyTorch channels-last."""
    import tensorflow as tf
    import torch
    import torch.nn.functional as F
    gflop = 2.0 * batch * size * size * channels * channels * 9 / 1e9
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, size, size, channels)).astype("float32")
    w = (rng.standard_normal((3, 3, channels, channels)) * 0.05).astype("float32")

    def best(fn):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return gflop / min(times)

    rates = {}
    xt, wt = tf.constant(x), tf.constant(w)
    for name, jit in (("TF", False), ("TF XLA", True)):
        conv = tf.function(lambda a, b: tf.nn.conv2d(a, b, 1, "SAME"), jit_compile=jit, autograph=False)
        rates[name] = best(lambda: conv(xt, wt).numpy())
    xp = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    wp = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    with torch.no_grad():
        rates["PyTorch"] = best(lambda: F.conv2d(xp, wp, padding=1))
        xc, wc = xp.contiguous(memory_format=torch.channels_last), wp.contiguous(memory_format=torch.channels_last)
        rates["PyTorch CL"] = best(lambda: F.conv2d(xc, wc, padding=1))
    return gflop, rates


# ===================================================================================================== main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=METHODS, help="one method (default: all five)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny backbone, batch 32, heads 512, XLA off unless --jit, fewer roofline repeats")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--backbone", choices=sorted(flops.SPECS))
    ap.add_argument("--hidden", type=int, help="head hidden width (default 2048; 512 with tiny, as the recipes)")
    ap.add_argument("--jit", dest="jit", action="store_true", default=None,
                    help="tfssl with XLA jit_compile (default, except with --quick)")
    ap.add_argument("--no-jit", dest="jit", action="store_false", help="tfssl without XLA (TF graph + oneDNN)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="extra untimed steps per framework after the first (warm-up / compile) call")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per framework (alternating); median")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--torch-channels-last", action="store_true", help="PyTorch in channels-last memory format")
    a = ap.parse_args()
    backbone = a.backbone or ("tiny" if a.quick else "resnet18")
    batch = a.batch or (32 if a.quick else 128)
    hidden = a.hidden or (512 if backbone == "tiny" else 2048)
    lr = 0.06 * batch / 256
    methods = (a.method,) if a.method else METHODS
    if a.jit is None:
        a.jit = not a.quick

    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    import torch
    torch.set_num_threads(a.threads)
    import keras
    from tfssl import backbones
    assert backbones.SPECS == flops.SPECS, "bench/flops.py SPECS differ from tfssl.backbones.SPECS"
    Step, Conv = torch_modules()

    load0 = os.getloadavg()
    print(f"tfssl step vs PyTorch: {backbone}, CIFAR stem, batch {batch}, {a.size} px, heads {hidden}-128, "
          f"SGD m0.9 lr {lr:g} wd 5e-4, online probe on")
    print(f"CPU: {os.cpu_count()} cores; threads: TF intra-op {tf.config.threading.get_intra_op_parallelism_threads()}"
          f" (inter-op {tf.config.threading.get_inter_op_parallelism_threads() or 'default'}), "
          f"PyTorch {torch.get_num_threads()} (inter-op {torch.get_num_interop_threads()}); "
          f"load average at start {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}")
    print(f"TF {tf.__version__} (Keras {keras.__version__}), tfssl XLA {'on' if a.jit else 'off'}; "
          f"PyTorch {torch.__version__} eager, oneDNN {torch.backends.mkldnn.is_available()}, "
          f"{'channels-last' if a.torch_channels_last else 'NCHW'}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"per method and framework: 1 untimed first call (tfssl: tracing{' + XLA compilation' if a.jit else ''})"
          f"{f' + {a.warmup} untimed steps' if a.warmup else ''}, then {a.repeats} timed steps alternating "
          f"tfssl/PyTorch; median")

    # ------------------------------------------------------------------ roofline
    rb, reps = 32, 3 if a.quick else 5
    conv_gflop, rates = peak_conv(rb, 32, 128, reps)
    peaks = dict(rates)                                   # best of every measurement in the run, per variant
    print(f"\npeak: 3x3 conv forward [{rb},32,32,128] -> 128 ({conv_gflop:.1f} GFLOP), best of {reps}: "
          + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + " GFLOP/s"
          + ("" if a.quick else  " (measured again after each method; the peak is the best of all)"))

    # ------------------------------------------------------------------ FLOP table
    kw = dict(backbone=backbone, size=a.size, hidden=hidden, queue=4096)
    step_flops = {m: flops.step_flops(m, batch=batch, **kw) for m in methods}
    bb = backbones.build_backbone(backbone)
    prof_total, prof_mm = flops.tf_profiler_flops(lambda x: bb(x, training=True),
                                                  tf.TensorSpec([batch, a.size, a.size, 3]))
    conv = 2.0 * batch * sum(m for _, m in flops.backbone_macs(backbone, a.size))
    print(f"\nFLOPs per step (analytic, 2 per multiply-add of conv/dense/loss matmuls; backward = 2x forward "
          f"less the stem's input gradient). Cross-check, {backbone} forward at batch {batch}: analytic "
          f"{conv / 1e9:.2f} GFLOP, TF profiler {prof_mm / 1e9:.2f} GFLOP conv+matmul "
          f"({prof_total / 1e9:.2f} with elementwise ops)")
    print(flops.table(list(step_flops.values())))

    # ------------------------------------------------------------------ step conv roofline
    roof_reps = 1 if a.quick else 2
    print(f"\nconv roofline of the step: every conv of {backbone} at batch {batch}, timed alone in TF "
          f"(graph / XLA, ms), best of {roof_reps}", flush=True)
    roof = step_roofline.conv_roofline(backbone, batch, a.size, reps=roof_reps)
    print(f"all convs of one pass: forward {roof['fwd']:.2f} s, forward + backward {roof['fwd_bwd']:.2f} s")

    # ------------------------------------------------------------------ per method
    results = []
    for method in methods:
        print(f"\n[{method}] building …", flush=True)
        model, params = build_tfssl(method, backbone, hidden, a.jit, lr)
        step = Step(method, backbone, 1.0, hidden, 128, 4096, lr, 10, hyper(method, params))
        copy_keras_weights(step, model, method)
        views_np, labels_np = make_batch(method, batch, a.size)
        views_tf = tuple(tf.constant(v) for v in views_np)
        data_tf = {"views": views_tf, "label": tf.constant(labels_np)}
        views_pt = to_torch(views_np, a.torch_channels_last)
        labels_pt = torch.from_numpy(labels_np).long()
        if a.torch_channels_last:
            step.student.to(memory_format=torch.channels_last)
            if step.teacher is not None:
                step.teacher.to(memory_format=torch.channels_last)

        # parity: same weights, same images (first ≤32 rows), forward loss only, PyTorch with TF 'same' padding
        n = min(batch, 32)
        sub_tf = tuple(v[:n] for v in views_tf)
        loss_tf = float(model.student_loss(sub_tf, model.teacher_outputs(sub_tf) if model.uses_teacher else {})[0])
        Conv.tf_same = True
        with torch.no_grad():
            loss_pt = float(step.loss([v[:n] for v in views_pt])[0])
        Conv.tf_same = False
        copy_keras_weights(step, model, method)           # undo the BN statistics the parity pass moved

        model.make_train_function()
        train_fn = model.train_function
        tf_times, pt_times = [], []

        def tf_step():
            t = time.perf_counter()
            logs = train_fn([data_tf])
            value = float(logs["loss"])
            return time.perf_counter() - t, value

        def pt_step():
            t = time.perf_counter()
            value = float(step.step(views_pt, labels_pt))
            return time.perf_counter() - t, value

        compile_s, _ = tf_step()
        first_pt, _ = pt_step()
        for _ in range(a.warmup):
            tf_step()
            pt_step()
        for _ in range(a.repeats):
            dt, tf_loss = tf_step()
            tf_times.append(dt)
            dt, pt_loss = pt_step()
            pt_times.append(dt)
        finite = math.isfinite(tf_loss) and math.isfinite(pt_loss)
        r = dict(method=method, tf=batch / statistics.median(tf_times), pt=batch / statistics.median(pt_times),
                 compile=compile_s, first_pt=first_pt, loss_tf=loss_tf, loss_pt=loss_pt, finite=finite,
                 tf_times=tf_times, pt_times=pt_times, load=os.getloadavg()[0])
        r["ratio"] = r["tf"] / r["pt"]
        total = step_flops[method].total
        r["tf_gflops"] = total / statistics.median(tf_times) / 1e9
        r["pt_gflops"] = total / statistics.median(pt_times) / 1e9
        shape = flops.METHOD_SHAPES[method]
        r["roof"] = batch / step_roofline.step_conv_time(roof, shape["student"], shape["teacher"])[0]
        results.append(r)
        print(f"[{method}] first call: tfssl {compile_s:.1f} s (trace{' + XLA compile' if a.jit else ''}), "
              f"PyTorch {first_pt:.1f} s; step times tfssl " + " ".join(f"{t:.2f}" for t in tf_times)
              + " s, PyTorch " + " ".join(f"{t:.2f}" for t in pt_times) + " s")
        print(f"[{method}] parity at init (batch {n}, same weights/images): loss tfssl {loss_tf:.4f}, PyTorch "
              f"{loss_pt:.4f} (|diff| {abs(loss_tf - loss_pt):.1e}); losses finite after the timed steps: {finite}")
        print(f"ratio {r['ratio']:.2f}  {method} (tfssl/PyTorch img/s)", flush=True)
        del model, step
        keras.backend.clear_session()
        if not a.quick:
            _, rates = peak_conv(rb, 32, 128, 2)
            peaks = {k: max(v, peaks[k]) for k, v in rates.items()}
            print(f"[{method}] peak conv now: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
                  + " GFLOP/s")

    peak = max(peaks.values())

    load1 = os.getloadavg()
    print(f"\nresults: {backbone}, batch {batch}, {a.size} px, {a.threads} threads, tfssl XLA "
          f"{'on' if a.jit else 'off'}; load average at end {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}")
    print(f"{'method':<8}{'tfssl s':>8}{'torch s':>8}{'tfssl img/s':>12}{'torch img/s':>12}{'ratio':>6}"
          f"{'GFLOP/step':>11}{'tfssl GF/s':>11}{'torch GF/s':>11}{'roof img/s':>11}{'tfssl %roof':>12}"
          f"{'torch %roof':>12}{'tfssl %peak':>12}{'torch %peak':>12}{'1st call s':>11}{'load':>6}")
    for r in results:
        total = step_flops[r["method"]].total / 1e9
        print(f"{r['method']:<8}{statistics.median(r['tf_times']):>8.2f}{statistics.median(r['pt_times']):>8.2f}"
              f"{r['tf']:>12.1f}{r['pt']:>12.1f}{r['ratio']:>6.2f}{total:>11.1f}{r['tf_gflops']:>11.1f}"
              f"{r['pt_gflops']:>11.1f}{r['roof']:>11.1f}{100 * r['tf'] / r['roof']:>11.0f}%"
              f"{100 * r['pt'] / r['roof']:>11.0f}%{100 * r['tf_gflops'] / peak:>11.0f}%"
              f"{100 * r['pt_gflops'] / peak:>11.0f}%{r['compile']:>11.1f}{r['load']:>6.1f}")
    print("roof img/s = the step's conv roofline (its convolutions alone, TF, see above); %roof = img/s / roof img/s")
    print(f"peak {peak:.1f} GFLOP/s = best 3x3 conv forward of the run ("
          + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + "); %peak = achieved GFLOP/s / peak")
    print("project an accelerator step as GFLOP/step / (device GFLOP/s x utilisation)")
    for r in results:
        print(f"ratio {r['ratio']:.2f}  {r['method']}  ({100 * r['tf'] / r['roof']:.0f}% of the conv roofline)")


if __name__ == "__main__":
    main()
