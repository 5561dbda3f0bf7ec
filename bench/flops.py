"""Analytic FLOP count of one tfssl training step (framework-free; used by bench/step_vs_torch.py).

Convention: only convolutions, dense layers and the loss matmuls are counted, at 2 FLOPs per multiply-add.
BatchNorm, ReLU, pooling, softmax, the EMA and the optimizer update are elementwise (memory-bound, O(params) or
O(activations)) and left out, as in the usual "FLOPs of a ResNet" figures.

* forward of a layer: 2 · (output positions) · C_out · C_in · k² per image (``same`` padding: out = ⌈in / stride⌉);
* backward of a student layer: the weight gradient (= forward) plus the input gradient (= forward), except the input
  gradient of the first convolution (the images need none), so backward ≈ 2 × forward;
* teacher passes are forward only; loss matmuls count their backward only towards operands that carry a gradient.

Project a step on an accelerator as ``total GFLOP / (device TFLOP/s · utilisation) / 1000`` seconds.

    python bench/flops.py [--backbone resnet18] [--batch 128] [--size 32]    # prints the table
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

# block type, blocks per stage, widths (must equal tfssl.backbones.SPECS; step_vs_torch.py asserts it)
SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": ("basic", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512)),
    "tiny": ("basic", (1, 1, 1, 1), (8, 16, 32, 64)),
    "small": ("basic", (1, 1, 1, 1), (32, 64, 128, 256)),    # 28-32 px images on CPUs: bench/QUALITY.md
}

# per method: student passes, teacher passes, head layout ("mlp": Linear-ReLU-Linear; "mlp_bn": Linear-BN-ReLU-Linear;
# "wcl": two heads Linear-BN-ReLU-Linear-BN-ReLU-Linear), defaults of the loss hyper-parameters that matter here
METHOD_SHAPES = {
    "ressl": dict(student=1, teacher=1, head="mlp", queue=True),
    "simclr": dict(student=2, teacher=0, head="mlp_bn", queue=False),
    "mocov2": dict(student=1, teacher=1, head="mlp", queue=True),
    "wcl": dict(student=2, teacher=0, head="wcl", queue=False),
    "csml": dict(student=3, teacher=2, head="mlp", queue=True),
}


def _out(n, stride):
    return -(-n // stride)


def backbone_macs(name="resnet18", size=32, cifar_stem=True, width=1.0, channels=3):
    """[(layer name, multiply-adds per image)] of every convolution of the backbone, in forward order."""
    kind, blocks, widths = SPECS[name]
    layers = []
    h = size
    stem = max(8, int(64 * width)) if name not in ("tiny", "small") else int(widths[0] * width)
    if cifar_stem:
        layers.append(("stem_conv", h * h * stem * channels * 9))
    else:
        h = _out(h, 2)
        layers.append(("stem_conv", h * h * stem * channels * 49))
        h = _out(h, 2)                                  # max-pool
    c = stem
    for s, n in enumerate(blocks):
        w = int(widths[s] * width)
        out_ch = w * (4 if kind == "bottleneck" else 1)
        for i in range(n):
            stride = 2 if (i == 0 and s > 0) else 1
            ho = _out(h, stride)
            name_ = f"s{s + 1}b{i + 1}"
            if stride != 1 or c != out_ch:
                layers.append((name_ + "_down", ho * ho * out_ch * c))
            if kind == "basic":
                layers.append((name_ + "_conv1", ho * ho * w * c * 9))
                layers.append((name_ + "_conv2", ho * ho * w * w * 9))
            else:
                layers.append((name_ + "_conv1", h * h * w * c))
                layers.append((name_ + "_conv2", ho * ho * w * w * 9))
                layers.append((name_ + "_conv3", ho * ho * out_ch * w))
            c, h = out_ch, ho
    return layers


def feature_dim(name="resnet18", width=1.0):
    kind, _, widths = SPECS[name]
    return int(widths[-1] * width) * (4 if kind == "bottleneck" else 1)


def head_macs(layout, in_dim, hidden, dim):
    """Multiply-adds per image of the method's head(s)."""
    if layout in ("mlp", "mlp_bn"):
        return in_dim * hidden + hidden * dim
    if layout == "wcl":                                  # instance head g and graph head φ, 3 linear layers each
        return 2 * (in_dim * hidden + hidden * hidden + hidden * dim)
    raise ValueError(layout)


@dataclass
class StepFlops:
    method: str
    student_views: int
    teacher_views: int
    fwd_view: float        # FLOPs of one student/teacher forward pass over the batch (backbone + head(s))
    bwd_view: float        # FLOPs of one student backward pass over the batch
    loss_fwd: float        # loss matmuls (similarities to the queue / the batch / the 1-NN graph), forward
    loss_bwd: float
    probe: float           # online linear probe, forward + backward
    batch: int

    @property
    def student(self):
        return self.student_views * (self.fwd_view + self.bwd_view)

    @property
    def teacher(self):
        return self.teacher_views * self.fwd_view

    @property
    def total(self):
        return self.student + self.teacher + self.loss_fwd + self.loss_bwd + self.probe


def step_flops(method, backbone="resnet18", size=32, batch=128, hidden=2048, dim=128, queue=4096, width=1.0,
               cifar_stem=True, num_classes=10):
    """:class:`StepFlops` of one training step of ``method`` (global batch ``batch``, one device)."""
    shape = METHOD_SHAPES[method]
    convs = backbone_macs(backbone, size, cifar_stem, width)
    feat = feature_dim(backbone, width)
    conv_macs = sum(m for _, m in convs)
    head = head_macs(shape["head"], feat, hidden, dim)
    fwd = 2.0 * batch * (conv_macs + head)
    bwd = 2.0 * fwd - 2.0 * batch * convs[0][1]          # no input gradient for the first convolution
    b, k, d = batch, queue, dim
    qmm = 2.0 * b * k * d                                 # one [B,D] x [D,K] similarity matmul
    bmm = 2.0 * (2 * b) * (2 * b) * d                     # [2B,D] x [D,2B] (NT-Xent over both views)
    if method == "ressl":                                 # teacher relation (no grad) + student relation
        loss_fwd, loss_bwd = 2 * qmm, qmm
    elif method == "mocov2":
        loss_fwd, loss_bwd = qmm, qmm
    elif method == "csml":                                # 6 InfoNCE terms, gradient into the queries only
        loss_fwd, loss_bwd = 6 * qmm, 6 * qmm
    elif method == "simclr":                              # anchors and candidates both carry the gradient
        loss_fwd, loss_bwd = bmm, 2 * bmm
    elif method == "wcl":                                 # NT-Xent + two 1-NN similarity graphs (no grad)
        graph = 2.0 * b * b * d                           # + two swapped sup-con terms (grad into queries only)
        loss_fwd, loss_bwd = bmm + 2 * graph + 2 * graph, 2 * bmm + 2 * graph
    else:
        raise ValueError(method)
    probe = 3 * 2.0 * batch * feat * num_classes if num_classes else 0.0
    return StepFlops(method, shape["student"], shape["teacher"], fwd, bwd, loss_fwd, loss_bwd, probe, batch)


def _g(x):
    """GFLOP with 4 significant digits in a fixed width."""
    return f"{x / 1e9:.4g}"


def table(rows):
    """Printable FLOP table (GFLOP per step) of a list of :class:`StepFlops`."""
    top = ("student", "teacher", "fwd/view", "bwd/view", "teacher", "loss", "total", "per")
    bottom = ("views", "views", "GFLOP", "GFLOP", "GFLOP", "GFLOP", "GFLOP/step", "image")
    lines = [f"{'method':<8}" + "".join(f"{c:>11}" for c in top), f"{'':<8}" + "".join(f"{c:>11}" for c in bottom)]
    for r in rows:
        vals = (r.student_views, r.teacher_views, _g(r.fwd_view), _g(r.bwd_view), _g(r.teacher),
                _g(r.loss_fwd + r.loss_bwd), _g(r.total), _g(r.total / r.batch))
        lines.append(f"{r.method:<8}" + "".join(f"{v:>11}" for v in vals))
    return "\n".join(lines)


def method_table(methods, batch, **kw):
    return table([step_flops(m, batch=batch, **kw) for m in methods])


def tf_profiler_flops(fn, *specs):
    """Float ops of ``tf.function`` ``fn`` traced on ``specs``, by TF's v1 profiler: (total, conv + matmul only).

    The profiler's registry counts elementwise ops too (1 FLOP per element), hence the second, comparable figure.
    """
    import tensorflow as tf
    graph = tf.function(fn).get_concrete_function(*specs).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    opts = builder(builder.float_operation()).with_empty_output().build()
    total = tf.compat.v1.profiler.profile(graph, options=opts).total_float_ops
    opts = (builder(builder.float_operation()).with_empty_output()
            .account_displayed_op_only(True).select(["float_ops"]).with_node_names(show_name_regexes=[".*"])
            .build())
    opts["account_type_regexes"] = ["Conv2D.*", "MatMul.*", "BatchMatMul.*"]
    matmul = tf.compat.v1.profiler.profile(graph, cmd="op", options=opts).total_float_ops
    return total, matmul


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--queue", type=int, default=4096)
    a = ap.parse_args()
    macs = sum(m for _, m in backbone_macs(a.backbone, a.size))
    print(f"{a.backbone}, CIFAR stem, {a.size} px: {2 * macs / 1e9:.3f} GFLOP forward per image (convolutions)")
    print(f"per step at batch {a.batch}, head hidden {a.hidden}, queue {a.queue}:")
    print(method_table(list(METHOD_SHAPES), a.batch, backbone=a.backbone, size=a.size, hidden=a.hidden,
                       queue=a.queue))


if __name__ == "__main__":
    main()
