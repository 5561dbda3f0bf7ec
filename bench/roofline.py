"""The conv roofline of a training step: how fast the step would run if only its convolutions took time.

    python bench/roofline.py [--backbone resnet18] [--batch 128] [--size 32] [--method ressl] [--reps 3]

Issue #9 defines the target against "the conv roofline measured with TF" for the step. This script measures it
directly: every convolution of the backbone, at its own shape in the step (batch, map size, channels, stride), is
timed in TensorFlow on its own, forward (teacher passes) and forward + both backward convolutions (input and
filter gradient; student passes; the stem needs no input gradient), with and without XLA, best of ``--reps``. The
step's conv time is the sum over layers and passes, each layer at its faster variant (the most favourable roofline
for TF). Everything else in a real step (BatchNorm, ReLU, heads, loss, EMA, optimizer, queue) costs time on top of
it, so ``step conv time / measured step time`` is the fraction of the roofline the step achieves.

``conv_roofline`` is imported by bench/step_vs_torch.py, which prints it next to the measured steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import flops  # noqa: E402


def backbone_convs(backbone, size):
    """[(name, input shape without batch, kernel shape, stride)] of every Conv2D of tfssl's backbone."""
    import keras
    from tfssl import backbones
    model = backbones.build_backbone(backbone)
    convs = [l for l in model._flatten_layers(include_self=False) if isinstance(l, keras.layers.Conv2D)]
    probe = keras.Model(model.input, [l.input for l in convs])      # every conv's input, at a concrete size
    inputs = probe(np.zeros((1, size, size, 3), "float32"))
    out = [(l.name, tuple(x.shape[1:]), tuple(l.kernel.shape), l.strides[0]) for l, x in zip(convs, inputs)]
    keras.backend.clear_session()
    return out


def _best(fn, reps, warm=True):
    if warm:
        fn()                                                  # trace / compile
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class _Layer:
    """One convolution at its step shape, with its (already traced) forward and forward + backward functions in
    TF graph mode and XLA; ``best`` keeps the fastest time seen per (pass, variant) over every ``time`` call."""

    def __init__(self, batch, shape, kernel, stride, grad_input=True):
        import tensorflow as tf
        rng = np.random.default_rng(0)
        self.x = tf.constant(rng.standard_normal((batch,) + shape).astype("float32"))
        self.w = tf.constant((rng.standard_normal(kernel) * 0.05).astype("float32"))
        y_shape = (batch, -(-shape[0] // stride), -(-shape[1] // stride), kernel[-1])
        self.dy = tf.constant(rng.standard_normal(y_shape).astype("float32"))
        self.fns = {}
        for jit in (False, True):
            @tf.function(jit_compile=jit, autograph=False)
            def forward(x, w):
                return tf.nn.conv2d(x, w, stride, "SAME")

            @tf.function(jit_compile=jit, autograph=False)
            def forward_backward(x, w, dy):
                with tf.GradientTape() as tape:
                    tape.watch([x, w])
                    y = tf.nn.conv2d(x, w, stride, "SAME")
                grads = tape.gradient(y, [x, w] if grad_input else [w], output_gradients=dy)
                return [y] + grads

            self.fns["fwd", jit] = lambda f=forward: f(self.x, self.w).numpy()
            self.fns["fb", jit] = lambda f=forward_backward: [t.numpy() for t in f(self.x, self.w, self.dy)]
        self.best = {}

    def time(self, reps, jit=(False, True)):
        """Time both passes ``reps`` times in each variant of ``jit`` (the first call of a variant also compiles
        it, untimed); keep the fastest of all runs so far."""
        for (kind, variant), fn in self.fns.items():
            if variant not in jit:
                continue
            if (kind, variant) not in self.best:
                fn()
                self.best[kind, variant] = float("inf")
            self.best[kind, variant] = min(self.best[kind, variant], _best(fn, reps, warm=False))

    def seconds(self, kind):
        """Fastest time of pass ``kind`` ('fwd' or 'fb') over both variants, and that variant (True = XLA)."""
        variant = min((v for k, v in self.best if k == kind), key=lambda v: self.best[kind, v])
        return self.best[kind, variant], variant


def time_layer(batch, shape, kernel, stride, reps, jit, grad_input=True):
    """Seconds of (forward, forward + backward) of one convolution, best of ``reps``."""
    layer = _Layer(batch, shape, kernel, stride, grad_input)
    layer.time(reps, jit=(jit,))
    return layer.best["fwd", jit], layer.best["fb", jit]


def time_layer_torch(batch, shape, kernel, stride, reps, grad_input=True, channels_last=False):
    """PyTorch's seconds of (forward, forward + backward) of the same convolution (symmetric padding), for
    comparison only (the roofline is TF's)."""
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.from_numpy(rng.standard_normal((batch,) + shape).astype("float32")).permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=fmt).requires_grad_(grad_input)
    w = torch.from_numpy((rng.standard_normal(kernel) * 0.05).astype("float32")).permute(3, 2, 0, 1)
    w = w.contiguous(memory_format=fmt).requires_grad_(True)
    pad = kernel[0] // 2
    y_hw = -(-shape[0] // stride)
    dy = torch.from_numpy(rng.standard_normal((batch, kernel[-1], y_hw, y_hw)).astype("float32"))
    dy = dy.contiguous(memory_format=fmt)

    def forward():
        with torch.no_grad():
            F.conv2d(x, w, stride=stride, padding=pad)

    def forward_backward():
        y = F.conv2d(x, w, stride=stride, padding=pad)
        torch.autograd.grad(y, [x, w] if grad_input else [w], dy)

    return _best(forward, reps), _best(forward_backward, reps)


class ConvRoofline:
    """Every conv of ``backbone`` at its step shape, each timed alone in TF (graph and XLA), best time kept.

    The roofline is a lower bound on conv time, so a reading taken while the machine is busy only overstates it;
    ``remeasure`` re-times every layer in its faster variant (already compiled: a few seconds) and keeps the
    minimum, so a run that measures again between its steps is not thrown off by one load spike.
    ``result()`` is the dict that ``step_conv_time`` takes.
    """

    def __init__(self, backbone, batch, size, reps=3, log=print):
        self.batch, self.log = batch, log
        self.layers = []
        for i, (name, shape, kernel, stride) in enumerate(backbone_convs(backbone, size)):
            layer = _Layer(batch, shape, kernel, stride, grad_input=i > 0)
            layer.time(reps)
            ho = -(-shape[0] // stride)
            macs = batch * ho * ho * kernel[0] * kernel[1] * kernel[2] * kernel[3]
            layer.info = dict(name=name, shape=shape, kernel=kernel, stride=stride,
                              gflop_f=2e-9 * macs, gflop_fb=2e-9 * macs * (3 if i > 0 else 2))
            self.layers.append(layer)
            if log:
                t = layer.best
                log(f"  {name:<14}{str(shape):>16}{str(kernel):>18}{stride:>3}  fwd {1e3 * t['fwd', False]:7.1f}/"
                    f"{1e3 * t['fwd', True]:7.1f} ms  fwd+bwd {1e3 * t['fb', False]:7.1f}/{1e3 * t['fb', True]:7.1f}"
                    f" ms  {layer.info['gflop_fb'] / layer.seconds('fb')[0]:6.1f} GFLOP/s")

    def remeasure(self, reps=1):
        """Re-time each layer's passes in their faster variant; returns the new total (fwd, fwd_bwd) seconds."""
        for layer in self.layers:
            layer.time(reps, jit={layer.seconds("fwd")[1], layer.seconds("fb")[1]})
        r = self.result()
        return r["fwd"], r["fwd_bwd"]

    def result(self):
        rows, fwd, fb = [], 0.0, 0.0
        for layer in self.layers:
            t = layer.best
            rows.append(dict(layer.info, fwd=t["fwd", False], fwd_xla=t["fwd", True], fb=t["fb", False],
                             fb_xla=t["fb", True]))
            fwd, fb = fwd + layer.seconds("fwd")[0], fb + layer.seconds("fb")[0]
        return dict(layers=rows, fwd=fwd, fwd_bwd=fb, flops_fwd=1e9 * sum(r["gflop_f"] for r in rows),
                    flops_fwd_bwd=1e9 * sum(r["gflop_fb"] for r in rows))


def conv_roofline(backbone, batch, size, reps=3, log=print):
    """Measure every conv of ``backbone`` once; returns dict(layers=[...], fwd=s, fwd_bwd=s, flops_fwd,
    flops_fwd_bwd): the seconds of all convolutions of one forward / forward + backward pass at ``batch``, each
    layer at the faster of TF's graph (oneDNN) and XLA (see ``ConvRoofline`` to re-measure)."""
    return ConvRoofline(backbone, batch, size, reps, log).result()


def step_conv_time(roof, student_views, teacher_views):
    """Conv seconds and conv FLOPs of a step with the given numbers of student (fwd+bwd) and teacher (fwd) passes."""
    seconds = student_views * roof["fwd_bwd"] + teacher_views * roof["fwd"]
    gflop = student_views * roof["flops_fwd_bwd"] + teacher_views * roof["flops_fwd"]
    return seconds, gflop


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18", choices=sorted(flops.SPECS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--torch", action="store_true", help="also time each conv in PyTorch (NCHW and channels-last)")
    a = ap.parse_args()
    import tensorflow as tf
    print(f"conv roofline: {a.backbone}, CIFAR stem, batch {a.batch}, {a.size} px, TF {tf.__version__}, "
          f"{len(os.sched_getaffinity(0))} threads; per layer best of {a.reps}, TF graph / XLA")
    roof = conv_roofline(a.backbone, a.batch, a.size, a.reps)
    print(f"all convs: forward {roof['fwd']:.2f} s ({roof['flops_fwd'] / roof['fwd'] / 1e9:.1f} GFLOP/s), "
          f"forward+backward {roof['fwd_bwd']:.2f} s ({roof['flops_fwd_bwd'] / roof['fwd_bwd'] / 1e9:.1f} GFLOP/s)")
    if a.torch:
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        total = {}
        for cl in (False, True):
            f = fb = 0.0
            for i, r in enumerate(roof["layers"]):
                tf_, tfb = time_layer_torch(a.batch, r["shape"], r["kernel"], r["stride"], a.reps, i > 0, cl)
                f, fb = f + tf_, fb + tfb
                print(f"  PyTorch{' CL' if cl else ''} {r['name']:<14} fwd {1e3 * tf_:7.1f} ms  fwd+bwd "
                      f"{1e3 * tfb:7.1f} ms (TF best {1e3 * min(r['fwd'], r['fwd_xla']):7.1f} / "
                      f"{1e3 * min(r['fb'], r['fb_xla']):7.1f})")
            total[cl] = (f, fb)
            print(f"PyTorch{' channels-last' if cl else ' NCHW'} all convs: forward {f:.2f} s, forward+backward "
                  f"{fb:.2f} s (TF: {roof['fwd']:.2f} / {roof['fwd_bwd']:.2f})")
    print(f"{'method':<8}{'student':>8}{'teacher':>8}{'conv s':>8}{'roof img/s':>11}{'GFLOP/s':>9}")
    for method, shape in flops.METHOD_SHAPES.items():
        s, g = step_conv_time(roof, shape["student"], shape["teacher"])
        print(f"{method:<8}{shape['student']:>8}{shape['teacher']:>8}{s:>8.2f}{a.batch / s:>11.1f}{g / s / 1e9:>9.1f}")


if __name__ == "__main__":
    main()
