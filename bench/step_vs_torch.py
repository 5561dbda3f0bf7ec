"""Full training step of each tfssl method against a PyTorch implementation of the same step, on this CPU.

    python bench/step_vs_torch.py [--method ressl] [--quick] [--batch 128] [--size 32] [--backbone resnet18]
                                  [--hidden 2048] [--jit | --no-jit] [--warmup 1] [--repeats 3] [--threads N]
                                  [--torch-layout both|nchw|cl]

What is timed: one whole training step on a fixed pre-made batch (no input pipeline): EMA update of the teacher,
teacher forward, student forward/backward, loss, SGD-momentum update, queue update, online linear probe. tfssl runs
its own ``model.train_step`` through Keras's compiled train function (``make_train_function``; with or without XLA as
``train.jit_compile: auto`` picks on this machine, unless ``--jit`` / ``--no-jit``); PyTorch runs the same step
written below (eager mode, same architecture, heads, views, losses and optimizer), in NCHW and in channels-last
memory format (``--torch-layout``), initialised with tfssl's weights and queue. Both frameworks get the same number of threads.

Protocol per method: build both, check that the two losses agree on the same weights and images (PyTorch then
switched to TF's ``same`` padding; timing uses PyTorch's usual symmetric padding), one untimed call per framework
(tracing + XLA compilation, reported separately), ``--warmup`` untimed steps each, then ``--repeats`` timed steps
*alternating* tfssl / PyTorch NCHW / PyTorch channels-last so all see the same machine load; the median step time
gives img/s (one image = one source image with all its views), the ratio is against PyTorch's faster layout. FLOPs are analytic (bench/flops.py; cross-checked with TF's profiler). The
roofline (issue #9: "the conv roofline measured with TF") is measured in the run by bench/roofline.py: every
convolution of the step at its own shape, timed alone in TF (forward for teacher passes, forward + both backward
convolutions for student passes, the faster of TF graph and XLA per layer, re-timed after
each method, best time kept); ``% roof`` = step img/s / the img/s the
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
LAYOUT = {"nchw": "NCHW", "cl": "channels-last"}


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
                    help="tfssl with XLA jit_compile (default: what train.jit_compile=auto picks on this machine; "
                         "off with --quick)")
    ap.add_argument("--no-jit", dest="jit", action="store_false", help="tfssl without XLA (TF graph + oneDNN)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="extra untimed steps per framework after the first (warm-up / compile) call (default 1, "
                         "0 with --quick)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per framework (alternating); median")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--torch-layout", choices=("both", "nchw", "cl"), default="both",
                    help="PyTorch memory format(s) timed: NCHW (PyTorch's default), channels-last, or both (default;"
                         " the ratio is against the faster)")
    a = ap.parse_args()
    backbone = a.backbone or ("tiny" if a.quick else "resnet18")
    batch = a.batch or (32 if a.quick else 128)
    hidden = a.hidden or (512 if backbone == "tiny" else 2048)
    lr = 0.06 * batch / 256
    if a.warmup is None:          # the first timed steps after the compile call ran slow for both frameworks
        a.warmup = 0 if a.quick else 1
    layouts = ("nchw", "cl") if a.torch_layout == "both" else (a.torch_layout,)
    methods = (a.method,) if a.method else METHODS

    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    import torch
    torch.set_num_threads(a.threads)
    import keras
    import tfssl.distribute
    from tfssl import backbones
    jit_reason = "--jit" if a.jit else "--no-jit"
    if a.jit is None:                                     # what a recipe's train.jit_compile: auto picks here
        a.jit, jit_reason = (False, "--quick") if a.quick else tfssl.distribute.resolve_jit_compile("auto")
    assert backbones.SPECS == flops.SPECS, "bench/flops.py SPECS differ from tfssl.backbones.SPECS"
    Step, Conv = torch_modules()

    load0 = os.getloadavg()
    print(f"tfssl step vs PyTorch: {backbone}, CIFAR stem, batch {batch}, {a.size} px, heads {hidden}-128, "
          f"SGD m0.9 lr {lr:g} wd 5e-4, online probe on")
    print(f"CPU: {os.cpu_count()} cores; threads: TF intra-op {tf.config.threading.get_intra_op_parallelism_threads()}"
          f" (inter-op {tf.config.threading.get_inter_op_parallelism_threads() or 'default'}), "
          f"PyTorch {torch.get_num_threads()} (inter-op {torch.get_num_interop_threads()}); "
          f"load average at start {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}")
    print(f"TF {tf.__version__} (Keras {keras.__version__}), tfssl XLA {'on' if a.jit else 'off'} ({jit_reason}); "
          f"PyTorch {torch.__version__} eager, oneDNN {torch.backends.mkldnn.is_available()}, "
          f"{' and '.join(LAYOUT[k] for k in layouts)}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"per method and framework: 1 untimed first call (tfssl: tracing{' + XLA compilation' if a.jit else ''})"
          f"{f' + {a.warmup} untimed steps' if a.warmup else ''}, then {a.repeats} timed steps alternating "
          f"tfssl / " + " / ".join(f"PyTorch {LAYOUT[k]}" for k in layouts) + "; median; ratio against PyTorch's "
          f"faster layout")

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
    roofline = step_roofline.ConvRoofline(backbone, batch, a.size, reps=roof_reps)
    roof = roofline.result()
    print(f"all convs of one pass: forward {roof['fwd']:.2f} s, forward + backward {roof['fwd_bwd']:.2f} s"
          + ("" if a.quick else " (re-timed after each method; every layer keeps its best time of the run)"))

    # ------------------------------------------------------------------ per method
    results = []
    for method in methods:
        print(f"\n[{method}] building …", flush=True)
        model, params = build_tfssl(method, backbone, hidden, a.jit, lr)
        views_np, labels_np = make_batch(method, batch, a.size)
        views_tf = tuple(tf.constant(v) for v in views_np)
        data_tf = {"views": views_tf, "label": tf.constant(labels_np)}
        labels_pt = torch.from_numpy(labels_np).long()
        torch_steps = {}                                  # layout → (PyTorch step, its views), same start
        for layout in layouts:
            step = Step(method, backbone, 1.0, hidden, 128, 4096, lr, 10, hyper(method, params))
            copy_keras_weights(step, model, method)
            if layout == "cl":
                for net in (step.student, step.teacher):
                    if net is not None:
                        net.to(memory_format=torch.channels_last)
            torch_steps[layout] = step, to_torch(views_np, layout == "cl")

        # parity: same weights, same images (first ≤32 rows), forward loss only, PyTorch with TF 'same' padding
        n = min(batch, 32)
        sub_tf = tuple(v[:n] for v in views_tf)
        loss_tf = float(model.student_loss(sub_tf, model.teacher_outputs(sub_tf) if model.uses_teacher else {})[0])
        step, views_pt = torch_steps[layouts[0]]
        Conv.tf_same = True
        with torch.no_grad():
            loss_pt = float(step.loss([v[:n] for v in views_pt])[0])
        Conv.tf_same = False
        copy_keras_weights(step, model, method)           # undo the BN statistics the parity pass moved

        model.make_train_function()
        train_fn = model.train_function

        def tf_step():
            t = time.perf_counter()
            logs = train_fn([data_tf])
            value = float(logs["loss"])
            return time.perf_counter() - t, value

        def pt_step(layout):
            step, views_pt = torch_steps[layout]
            t = time.perf_counter()
            value = float(step.step(views_pt, labels_pt))
            return time.perf_counter() - t, value

        compile_s, _ = tf_step()
        first_pt = {layout: pt_step(layout)[0] for layout in layouts}
        for _ in range(a.warmup):
            tf_step()
            for layout in layouts:
                pt_step(layout)
        times = {name: [] for name in ("tf",) + layouts}
        last = {}
        for _ in range(a.repeats):                        # alternate: tfssl, PyTorch NCHW, PyTorch channels-last
            for name in times:
                dt, last[name] = tf_step() if name == "tf" else pt_step(name)
                times[name].append(dt)
        finite = all(math.isfinite(v) for v in last.values())
        total = step_flops[method].total
        med = {name: statistics.median(t) for name, t in times.items()}
        best = min(layouts, key=med.get)                  # PyTorch's faster layout: what tfssl is compared with
        r = dict(method=method, times=times, med=med, best=best, compile=compile_s, first_pt=first_pt,
                 loss_tf=loss_tf, loss_pt=loss_pt, finite=finite, load=os.getloadavg()[0],
                 tf=batch / med["tf"], pt=batch / med[best], tf_gflops=total / med["tf"] / 1e9,
                 pt_gflops=total / med[best] / 1e9)
        r["ratio"] = r["tf"] / r["pt"]
        results.append(r)
        print(f"[{method}] first call: tfssl {compile_s:.1f} s (trace{' + XLA compile' if a.jit else ''}), PyTorch "
              + ", ".join(f"{LAYOUT[k]} {v:.1f} s" for k, v in first_pt.items()) + "; step times: "
              + "; ".join(("tfssl" if k == "tf" else f"PyTorch {LAYOUT[k]}") + " " + " ".join(f"{t:.2f}" for t in v)
                          for k, v in times.items()) + " s")
        print(f"[{method}] parity at init (batch {n}, same weights/images): loss tfssl {loss_tf:.4f}, PyTorch "
              f"{loss_pt:.4f} (|diff| {abs(loss_tf - loss_pt):.1e}); losses finite after the timed steps: {finite}")
        print(f"ratio {r['ratio']:.2f}  {method} (tfssl/PyTorch img/s, PyTorch {LAYOUT[best]}"
              + "".join(f"; vs {LAYOUT[k]} {med[k] / med['tf']:.2f}" for k in layouts if k != best) + ")", flush=True)
        del model, step, torch_steps
        keras.backend.clear_session()
        if not a.quick:
            _, rates = peak_conv(rb, 32, 128, 2)
            peaks = {k: max(v, peaks[k]) for k, v in rates.items()}
            print(f"[{method}] peak conv now: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
                  + " GFLOP/s")
            fwd, fb = roofline.remeasure(1)
            print(f"[{method}] conv roofline re-timed: best of the run so far forward {fwd:.2f} s, forward + "
                  f"backward {fb:.2f} s", flush=True)

    peak = max(peaks.values())
    roof = roofline.result()                              # every layer's best time of the whole run
    for r in results:
        shape = flops.METHOD_SHAPES[r["method"]]
        r["roof"] = batch / step_roofline.step_conv_time(roof, shape["student"], shape["teacher"])[0]

    load1 = os.getloadavg()
    print(f"\nresults: {backbone}, batch {batch}, {a.size} px, {a.threads} threads, tfssl XLA "
          f"{'on' if a.jit else 'off'}; load average at end {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}")
    cols = "".join(f"{'torch ' + k + ' s':>13}" for k in layouts)
    print(f"{'method':<8}{'tfssl s':>8}{cols}{'tfssl img/s':>12}{'torch img/s':>12}{'ratio':>6}"
          f"{'GFLOP/step':>11}{'tfssl GF/s':>11}{'torch GF/s':>11}{'roof img/s':>11}{'tfssl %roof':>12}"
          f"{'torch %roof':>12}{'tfssl %peak':>12}{'torch %peak':>12}{'1st call s':>11}{'load':>6}")
    for r in results:
        total = step_flops[r["method"]].total / 1e9
        print(f"{r['method']:<8}{r['med']['tf']:>8.2f}" + "".join(f"{r['med'][k]:>13.2f}" for k in layouts)
              + f"{r['tf']:>12.1f}{r['pt']:>12.1f}{r['ratio']:>6.2f}{total:>11.1f}{r['tf_gflops']:>11.1f}"
              f"{r['pt_gflops']:>11.1f}{r['roof']:>11.1f}{100 * r['tf'] / r['roof']:>11.0f}%"
              f"{100 * r['pt'] / r['roof']:>11.0f}%{100 * r['tf_gflops'] / peak:>11.0f}%"
              f"{100 * r['pt_gflops'] / peak:>11.0f}%{r['compile']:>11.1f}{r['load']:>6.1f}")
    print("torch img/s, GF/s, %roof, %peak and ratio: PyTorch's faster layout per method (" +
          ", ".join(f"{r['method']} {LAYOUT[r['best']]}" for r in results) + ")")
    print(f"roof img/s = the step's conv roofline (its convolutions alone in TF, each layer's best time of the run: "
          f"one pass forward {roof['fwd']:.2f} s, forward + backward {roof['fwd_bwd']:.2f} s); "
          f"%roof = img/s / roof img/s")
    print(f"peak {peak:.1f} GFLOP/s = best 3x3 conv forward of the run ("
          + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + "); %peak = achieved GFLOP/s / peak")
    print("project an accelerator step as GFLOP/step / (device GFLOP/s x utilisation)")
    for r in results:
        print(f"ratio {r['ratio']:.2f}  {r['method']}  ({100 * r['tf'] / r['roof']:.0f}% of the conv roofline)")


if __name__ == "__main__":
    main()
