"""The PyTorch side of bench/end_to_end.py: a method's Fashion-MNIST recipe trained for a fixed number of steps the
way a PyTorch user would write it on a CPU — the same data, views, network, heads, loss and optimiser as tfssl's
recipe — printing one JSON line with the steady-state images/s. Benchmark only (the library never imports torch).

    python bench/torch_end_to_end.py RECIPE_JSON STEPS

``RECIPE_JSON``: the resolved recipe (``tfssl.config.Config.to_dict()``) that end_to_end.py also gives tfssl. Data:
the Fashion-MNIST idx files, uint8 in memory, a seeded permutation per epoch. Views: batched tensor ops on the
batch (RandomResizedCrop by ``affine_grid`` + bilinear ``grid_sample`` on crop_and_resize's grid, flip, brightness
and contrast jitter, grayscale), made in the main thread before each step (on 2 cores a DataLoader's workers would
only compete with the step). Network, heads, losses, EMA, queue, SGD and probe: bench/torch_reference.py. CsMl:
neighbours re-mined with the teacher at every ``mine_every``-th epoch start (top-k cosine, self excluded), pairs
drawn from them, one CutMix box per batch. WCL: MoCo-v2-strength views for the warm-up steps, then SimCLR strength.
Epoch 1 warms up (oneDNN primitives, first-call costs); epoch 2 is timed: ``STEPS`` steps each, and CsMl's mining at
the epoch start (tfssl's epoch time includes it too: its miner is a callback at the epoch start).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from torch_reference import torch_modules  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"
STRENGTH = {"strong": ("jitter", (0.2, 1.0)), "simclr": ("strong_jitter", (0.08, 1.0)), "weak": (None, (0.2, 1.0))}
PRESET = {"fashion_mnist": {"jitter": (0.4, 0.4), "strong_jitter": (0.4, 0.4)}}


def load_images(limit):
    with gzip.open(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FMNIST, "train-labels-idx1-ubyte.gz")) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    n = limit or len(x)
    return torch.from_numpy(x[:n].copy()), torch.from_numpy(y[:n].copy())


def prepare(images, size, channels):
    """uint8 [N, 28, 28] → float [N, C, size, size] in [0, 1] (antialiased resize as tfssl's source, once)."""
    x = images.float().div(255.0)[:, None]
    if size != 28:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.expand(-1, channels, -1, -1).contiguous()


def crop(x, size, scale, gen):
    """RandomResizedCrop on a batch: area ∈ scale, log-uniform aspect (3/4, 4/3), box clipped, bilinear resample."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=gen)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    r = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
    h, w = torch.sqrt(area / r).clamp(max=1.0), torch.sqrt(area * r).clamp(max=1.0)
    y0, x0 = u[:, 2] * (1 - h), u[:, 3] * (1 - w)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = w, h                       # align_corners=True: [-1, 1] spans pixel centres
    theta[:, 0, 2], theta[:, 1, 2] = 2 * x0 + w - 1, 2 * y0 + h - 1
    grid = F.affine_grid(theta, (b, x.shape[1], size, size), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", align_corners=True)


def view(x, recipe, size, gen, crop_scale=None):
    jitter, scale = STRENGTH[recipe]
    out = crop(x, size, tuple(crop_scale or scale), gen)
    b = out.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    if jitter is None:
        return out
    bri, con = PRESET["fashion_mnist"][jitter]
    jittered = (out * torch.empty(b, 1, 1, 1).uniform_(1 - bri, 1 + bri, generator=gen)).clamp(0, 1)
    mean = jittered.mean((1, 2, 3), keepdim=True)
    jittered = ((jittered - mean) * torch.empty(b, 1, 1, 1).uniform_(1 - con, 1 + con, generator=gen) + mean).clamp(0, 1)
    out = torch.where((torch.rand(b, generator=gen) < 0.8)[:, None, None, None], jittered, out)
    gray = out.mean(1, keepdim=True).expand_as(out) if out.shape[1] == 3 else out
    return torch.where((torch.rand(b, generator=gen) < 0.2)[:, None, None, None], gray, out)


def cutmix(a, b, gen):
    """One Beta(2, 2) box per batch; returns (mixed, λ′ = the anchor's kept fraction)."""
    lam = float(torch.distributions.Beta(2.0, 2.0).sample())
    hgt, wid = a.shape[2], a.shape[3]
    cut = math.sqrt(1 - lam)
    ch, cw = round(cut * hgt), round(cut * wid)
    cy, cx = int(torch.randint(hgt, (1,), generator=gen)), int(torch.randint(wid, (1,), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy - ch // 2 + ch, hgt)
    x0, x1 = max(cx - cw // 2, 0), min(cx - cw // 2 + cw, wid)
    mixed = a.clone()
    mixed[:, :, y0:y1, x0:x1] = b[:, :, y0:y1, x0:x1]
    return mixed, 1.0 - (y1 - y0) * (x1 - x0) / (hgt * wid)


def mine(step, x, k):
    """CsMl's neighbour table: top-k cosine neighbours of every image (teacher features, centre view, inference BN)."""
    net = step.teacher[0]
    net.eval()
    with torch.no_grad():
        feats = torch.cat([F.normalize(net(x[i:i + 1024]), dim=1) for i in range(0, len(x), 1024)])
        table = torch.cat([(feats[i:i + 1024] @ feats.t()).index_fill_(1, torch.arange(i, min(i + 1024, len(x))),
                                                                       -3.0).topk(k, dim=1).indices
                           for i in range(0, len(x), 1024)])
    net.train()
    return table


def main():
    cfg, steps = json.loads(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    method, model, train, aug, data = cfg["method"], cfg["model"], cfg["train"], cfg["augment"], cfg["data"]
    name = method["name"]
    images, labels = load_images(data["limit"])
    x = prepare(images, data["image_size"], data["channels"])
    Step, _ = torch_modules()
    batch = train["batch_size"]
    lr = train["lr"] * (batch / 256 if train["lr_scaling"] == "linear" else math.sqrt(batch)
                        if train["lr_scaling"] == "sqrt" else 1.0)
    hp = {k: v for k, v in method.items() if k != "name"}
    hp.update(w0=1.0, w1=0.0)
    mixed = train["precision"] == "mixed_bfloat16" or (train["precision"] == "auto" and os.environ.get("TFSSL_BF16"))
    step = Step(name, model["backbone"], model["width"], model["projector_hidden"], model["projector_dim"],
                method.get("queue_size", 4096), lr, 10, hp, channels=data["channels"], mean=0.286, std=0.353,
                weight_decay=train["weight_decay"], momentum=train["momentum"],
                autocast=torch.bfloat16 if mixed else None, projector_bn=model.get("projector_bn", False))
    size, crop_scale = aug["size"], aug.get("crop_scale")
    warmup = int(round(method.get("view_warmup_epochs", 0) * steps)) if name == "wcl" else 0
    recipes = {"ressl": ("strong", "weak"), "mocov2": ("strong", "strong"), "simclr": ("simclr", "simclr"),
               "wcl": ("simclr", "simclr"), "csml": ("strong", "strong")}[name]
    table, done, times = None, 0, []
    for epoch in range(2):
        start = time.perf_counter()      # an epoch's time includes its mining, as tfssl's (the miner's epoch start)
        if name == "csml" and epoch % method.get("mine_every", 1) == 0:
            table = mine(step, x, method.get("neighbours", 5))
        order = torch.randperm(len(x), generator=gen)
        for s in range(steps):
            idx = order[(s * batch) % len(x):][:batch]
            if len(idx) < batch:
                idx = order[:batch]
            rec = ("strong", "strong") if done < warmup else recipes
            a = x[idx]
            v = [view(a, rec[0], size, gen, crop_scale), view(a, rec[1], size, gen, crop_scale)]
            if name == "csml":
                nb = x[table[idx, torch.randint(table.shape[1], (batch,), generator=gen)]]
                qj, kj = view(nb, "strong", size, gen, crop_scale), view(nb, "strong", size, gen, crop_scale)
                qm, lam = cutmix(v[0], qj, gen)
                v += [qj, kj, qm, torch.full((batch,), lam)]
            step.step(v, labels[idx])
            done += 1
        times.append(time.perf_counter() - start)
    print(json.dumps({"method": name, "images_per_second": steps * batch / times[-1], "epoch_seconds": times,
                      "threads": torch.get_num_threads(), "bf16": bool(mixed), "torch": torch.__version__,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}))


if __name__ == "__main__":
    main()
