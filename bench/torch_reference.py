"""The PyTorch side of bench/step_vs_torch.py: the same training step as tfssl's, written in PyTorch (ResNet with
the CIFAR stem, the methods' heads and losses, SGD with momentum, EMA teacher, queue, online probe), and the copy of
tfssl's initial weights into it. Benchmark only: the library never imports torch."""
from __future__ import annotations

import math

import flops

def torch_modules():
    """The PyTorch implementation (imported lazily: torch is a benchmark-only dependency)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Conv(nn.Conv2d):
        """Conv without bias; ``tf_same`` switches to TF's ``same`` padding (extra row/column at the end only)."""

        tf_same = False

        def __init__(self, cin, cout, k, stride):
            super().__init__(cin, cout, k, stride=stride, padding=k // 2, bias=False)

        def forward(self, x):
            if self.tf_same and self.stride[0] > 1 and self.kernel_size[0] > 1:
                total = max((math.ceil(x.shape[-1] / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0]
                            - x.shape[-1], 0)
                x = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
                return F.conv2d(x, self.weight, None, self.stride, 0)
            return super().forward(x)

    def bn2d(c):
        return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)      # = Keras momentum 0.9

    class ResNet(nn.Module):
        """tfssl.backbones.build_backbone (basic/bottleneck, CIFAR or ImageNet stem); modules keyed by Keras names."""

        def __init__(self, name="resnet18", cifar_stem=True, width=1.0, channels=3, mean=0.5, std=0.5):
            super().__init__()
            kind, blocks, widths = flops.SPECS[name]
            self.kind, self.cifar_stem = kind, cifar_stem
            self.register_buffer("mean", torch.full((1, channels, 1, 1), mean))
            self.register_buffer("std", torch.full((1, channels, 1, 1), std))
            self.convs, self.bns = nn.ModuleDict(), nn.ModuleDict()
            stem = max(8, int(64 * width)) if name not in ("tiny", "small") else int(widths[0] * width)
            self.convs["stem_conv"] = Conv(channels, stem, 3 if cifar_stem else 7, 1 if cifar_stem else 2)
            self.bns["stem_bn"] = bn2d(stem)
            self.plan, c = [], stem
            for s, n in enumerate(blocks):
                w = int(widths[s] * width)
                out = w * (4 if kind == "bottleneck" else 1)
                for i in range(n):
                    stride, key = (2 if (i == 0 and s > 0) else 1), f"s{s + 1}b{i + 1}"
                    down = stride != 1 or c != out
                    if down:
                        self.convs[key + "_down"], self.bns[key + "_down_bn"] = Conv(c, out, 1, stride), bn2d(out)
                    if kind == "basic":
                        specs = [(c, w, 3, stride), (w, w, 3, 1)]
                    else:
                        specs = [(c, w, 1, 1), (w, w, 3, stride), (w, out, 1, 1)]
                    for j, (ci, co, k, st) in enumerate(specs):
                        self.convs[f"{key}_conv{j + 1}"], self.bns[f"{key}_bn{j + 1}"] = Conv(ci, co, k, st), bn2d(co)
                    self.plan.append((key, len(specs), down))
                    c = out
            self.feature_dim = c

        def forward(self, x):
            x = (x - self.mean) / self.std
            x = F.relu(self.bns["stem_bn"](self.convs["stem_conv"](x)))
            if not self.cifar_stem:
                x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-math.inf) if Conv.tf_same else x, 3, 2,
                                 0 if Conv.tf_same else 1)
            for key, n, down in self.plan:
                y = x
                for j in range(1, n + 1):
                    y = self.bns[f"{key}_bn{j}"](self.convs[f"{key}_conv{j}"](y))
                    if j < n:
                        y = F.relu(y)
                shortcut = self.bns[key + "_down_bn"](self.convs[key + "_down"](x)) if down else x
                x = F.relu(shortcut + y)
            return x.mean((2, 3))

    class MLP(nn.Module):
        """tfssl.backbones.build_mlp: Linear-[BN]-ReLU-…-Linear; hidden Linear layers lose their bias under BN."""

        def __init__(self, in_dim, dims, batch_norm):
            super().__init__()
            self.layers, self.keys, d = nn.ModuleList(), [], in_dim
            for i, o in enumerate(dims):
                last = i == len(dims) - 1
                self.layers.append(nn.Linear(d, o, bias=last or not batch_norm))
                self.keys.append(f"fc{i + 1}")
                if not last:
                    if batch_norm:
                        self.layers.append(nn.BatchNorm1d(o, eps=1e-5, momentum=0.1))
                        self.keys.append(f"bn{i + 1}")
                    self.layers.append(nn.ReLU())
                    self.keys.append(None)
                d = o

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    # ------------------------------------------------------------------------------------------- losses
    def info_nce(q, k, queue, tau):
        """Per-row MoCo InfoNCE: positive q·k against the queue negatives."""
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / tau
        return torch.logsumexp(logits, 1) - logits[:, 0]

    def nt_xent(z1, z2, tau):
        """SimCLR NT-Xent, mean over the 2B anchors (self excluded, positive = other view)."""
        b = z1.shape[0]
        z = torch.cat([z1, z2])
        logits = (z @ z.t() / tau).masked_fill(torch.eye(2 * b, dtype=torch.bool), -1e9)
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
        return F.cross_entropy(logits, target)

    def weak_labels(h):
        """Connected components of the 1-NN cosine graph (symmetrised similarities, ties to the lower index),
        by pointer jumping p ← p[p] onto each component's mutual pair, labelled by the pair's lower index."""
        n = h.shape[0]
        sim = h @ h.t()
        sim = ((sim + sim.t()) / 2).fill_diagonal_(-3.0)
        nn_idx = sim.argmax(1)
        p = nn_idx
        for _ in range(math.ceil(math.log2(max(n, 2))) + 1):
            p = p[p]
        root = torch.minimum(p, nn_idx[p])
        first = (root == torch.arange(n)).long().cumsum(0) - 1
        return first[root]

    def sup_con(q, keys, q_labels, k_labels, tau):
        """Supervised contrastive terms, query i's own key column excluded from positives and denominator."""
        eye = torch.eye(q.shape[0], dtype=torch.bool)
        logits = (q @ keys.t() / tau).masked_fill(eye, -1e9)
        pos = (q_labels[:, None] == k_labels[None, :]) & ~eye
        log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
        return -(log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)

    # ------------------------------------------------------------------------------------------- the step
    class Step:
        """One method's model, teacher, queue, optimizers and ``step(views, labels)`` (same order as tfssl)."""

        def __init__(self, method, backbone, width, hidden, dim, queue_size, lr, num_classes, hp, channels=3,
                     mean=0.5, std=0.5, weight_decay=5e-4, momentum=0.9, autocast=None, projector_bn=None):
            self.method, self.hp, self.autocast = method, hp, autocast     # autocast: None or torch.bfloat16
            head = flops.METHOD_SHAPES[method]["head"]
            if projector_bn and head == "mlp":          # the recipe's model.projector_bn (tfssl's build_mlp)
                head = "mlp_bn"
            self.backbone = ResNet(backbone, width=width, channels=channels, mean=mean, std=std)
            feat = self.backbone.feature_dim
            if head == "wcl":
                make_heads = lambda: nn.ModuleList([MLP(feat, [hidden, hidden, dim], True),  # noqa
                                                    MLP(feat, [hidden, hidden, dim], True)])
            else:
                make_heads = lambda: nn.ModuleList([MLP(feat, [hidden, dim], head == "mlp_bn")])  # noqa
            self.heads = make_heads()
            self.student = nn.ModuleList([self.backbone, self.heads])
            self.teacher = None
            if flops.METHOD_SHAPES[method]["teacher"]:
                self.teacher = nn.ModuleList([ResNet(backbone, width=width, channels=channels, mean=mean, std=std),
                                              make_heads()])
                self.teacher.load_state_dict(self.student.state_dict())
                for p in self.teacher.parameters():
                    p.requires_grad_(False)
                self.pairs = (list(self.teacher.parameters()), list(self.student.parameters()))
            if flops.METHOD_SHAPES[method]["queue"]:
                self.queue = F.normalize(torch.randn(queue_size, dim), dim=1)
                self.ptr = 0
            params = list(self.student.parameters())
            self.opt = torch.optim.SGD([{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
                                        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                                       lr=lr, momentum=momentum)
            self.probe = nn.Linear(feat, num_classes)
            self.probe_opt = torch.optim.SGD(self.probe.parameters(), lr=0.1, momentum=0.9)
            self.student.train()
            if self.teacher is not None:
                self.teacher.train()                      # teacher BN on batch statistics, as in tfssl / MoCo

        def embed(self, x, net=None):
            """(features, [L2-normalised head outputs]) of the student (or ``net``)."""
            bb, heads = net if net is not None else self.student
            f = bb(x)
            return f, [F.normalize(h(f), dim=1) for h in heads]

        def teacher_key(self, x):
            with torch.no_grad():
                return self.embed(x, self.teacher)[1][0]

        def loss(self, views):
            """(loss, features of view 1, keys to enqueue) of the method on ``views`` (NCHW tensors)."""
            hp, m = self.hp, self.method
            if m == "ressl":
                k = self.teacher_key(views[1])
                f, (q,) = self.embed(views[0])
                p_t = F.softmax(k @ self.queue.t() / hp["teacher_temperature"], 1)
                log_p_s = F.log_softmax(q @ self.queue.t() / hp["student_temperature"], 1)
                return -(p_t * log_p_s).sum(1).mean(), f, k
            if m == "mocov2":
                k = self.teacher_key(views[1])
                f, (q,) = self.embed(views[0])
                return info_nce(q, k, self.queue, hp["temperature"]).mean(), f, k
            if m == "simclr":
                f, (z1,) = self.embed(views[0])
                _, (z2,) = self.embed(views[1])
                return nt_xent(z1, z2, hp["temperature"]), f, None
            if m == "wcl":
                f, (z1, h1) = self.embed(views[0])
                _, (z2, h2) = self.embed(views[1])
                with torch.no_grad():
                    l1, l2 = weak_labels(h1), weak_labels(h2)
                graph = (sup_con(h1, h1.detach(), l2, l2, hp["graph_temperature"]).sum()
                         + sup_con(h2, h2.detach(), l1, l1, hp["graph_temperature"]).sum()) / (2 * h1.shape[0])
                return nt_xent(z1, z2, hp["temperature"]) + graph, f, None
            if m == "csml":
                ki, kj = self.teacher_key(views[1]), self.teacher_key(views[3])
                f, (qi,) = self.embed(views[0])
                _, (qj,) = self.embed(views[2])
                _, (qm,) = self.embed(views[4])
                lam, w0, w1, tau = views[5], hp["w0"], hp["w1"], hp["temperature"]

                def ell(q, k):
                    return info_nce(q, k, self.queue, tau)

                total = (w0 * ell(qi, ki) + w1 * ell(qi, kj) + w0 * ell(qj, kj) + w1 * ell(qj, ki)
                         + lam * ell(qm, ki) + (1 - lam) * ell(qm, kj)) / 3
                return total.mean(), f, ki
            raise ValueError(m)

        def step(self, views, labels):
            if self.teacher is not None:                  # EMA first, as tfssl's train_step
                with torch.no_grad():
                    m = self.hp["momentum"]
                    torch._foreach_mul_(self.pairs[0], m)
                    torch._foreach_add_(self.pairs[0], self.pairs[1], alpha=1 - m)
            if self.autocast is not None:                 # mixed precision as tfssl's mixed_bfloat16: 16-bit layers,
                with torch.autocast("cpu", dtype=self.autocast):      # float32 weights; losses in float32
                    loss, features, keys = self.loss(views)
                loss, features = loss.float(), features.float()
                keys = keys.float() if keys is not None else None
            else:
                loss, features, keys = self.loss(views)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if keys is not None:
                with torch.no_grad():
                    idx = (self.ptr + torch.arange(keys.shape[0])) % self.queue.shape[0]
                    self.queue[idx] = keys
                    self.ptr = (self.ptr + keys.shape[0]) % self.queue.shape[0]
            probe_loss = F.cross_entropy(self.probe(features.detach()), labels)
            self.probe_opt.zero_grad(set_to_none=True)
            probe_loss.backward()
            self.probe_opt.step()
            return loss.detach()

    return Step, Conv


def copy_keras_weights(step, model, method):
    """Load tfssl's student/teacher weights and queue into the PyTorch step (conv HWIO → OIHW, dense [in,out] →
    [out,in], BN γ/β/moving statistics), so both start from the same point."""
    import torch

    def load_net(bb_t, heads_t, bb_k, heads_k):
        with torch.no_grad():
            for name, conv in bb_t.convs.items():
                conv.weight.copy_(torch.from_numpy(bb_k.get_layer(name).kernel.numpy().transpose(3, 2, 0, 1)))
            bns = [(bn, bb_k.get_layer(name)) for name, bn in bb_t.bns.items()]
            for head_t, head_k in zip(heads_t, heads_k):
                for layer, key in zip(head_t.layers, head_t.keys):
                    if key is None:
                        continue
                    k = head_k.get_layer(f"{head_k.name}_{key}")
                    if isinstance(layer, torch.nn.Linear):
                        layer.weight.copy_(torch.from_numpy(k.kernel.numpy().T))
                        if layer.bias is not None:
                            layer.bias.copy_(torch.from_numpy(k.bias.numpy()))
                    else:
                        bns.append((layer, k))
            for bn, k in bns:
                for dst, src in ((bn.weight, k.gamma), (bn.bias, k.beta), (bn.running_mean, k.moving_mean),
                                 (bn.running_var, k.moving_variance)):
                    dst.copy_(torch.from_numpy(src.numpy()))

    heads = [model.projector] + ([model.graph_head] if method == "wcl" else [])
    load_net(step.backbone, step.heads, model.backbone, heads)
    if step.teacher is not None:
        load_net(step.teacher[0], step.teacher[1], model.teacher_backbone, [model.teacher_projector])
    if hasattr(step, "queue"):
        step.queue = torch.from_numpy(model.queue.numpy().copy())
        step.ptr = int(model.queue_ptr.numpy())
    step.probe.weight.data.copy_(torch.from_numpy(model.probe.kernel.numpy().T))
    step.probe.bias.data.copy_(torch.from_numpy(model.probe.bias.numpy()))
