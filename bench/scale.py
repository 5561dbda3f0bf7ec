"""Pretraining throughput on this machine: 1 device vs 2 logical replicas vs 2 local worker processes, and
float32 vs mixed_bfloat16 — the same recipe, run side by side in one invocation through the real CLI.

    python bench/scale.py [--backbone tiny] [--batch 128] [--steps 6] [--epochs 3] [--recipe ressl_fashion_mnist]

Every row is a full ``tfssl pretrain`` (or ``tfssl launch-local --workers 2``) on Fashion-MNIST with XLA off (XLA
collectives do not exist on CPU, so a multi-worker step cannot use it; the other rows match it). The figure is the
training images/s of the last epoch (``epoch_images_per_second``: the first epoch includes tracing), global batch
images per second of wall time of the whole job. All rows share the same 2 cores, so 2 replicas or 2 workers split
them rather than add compute: the ratio shows the cost of the replication machinery, not a speed-up.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(label, command, workdir, sets):
    argv = [sys.executable, "-m", "tfssl"] + command + ["--workdir", workdir] + sum((["--set", s] for s in sets), [])
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT))
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    return {"label": label, "img_s": summary["history"]["epoch_images_per_second"][-1],
            "replicas": summary["replicas"], "loss": summary["final_loss"], "wall": wall}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="ressl_fashion_mnist")
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    sets = [f"model.backbone={args.backbone}", f"train.batch_size={args.batch}", f"train.epochs={args.epochs}",
            f"train.steps_per_epoch={args.steps}", "train.jit_compile=false", "train.verbose=0", "train.knn_every=0",
            f"data.limit={args.batch * args.steps}", "data.test_limit=256", f"eval.knn_train_limit={args.batch}",
            "method.queue_size=1024"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("1 device, float32", ["pretrain", args.recipe], []),
                 ("2 logical replicas (mirrored), float32", ["pretrain", args.recipe],
                  ["distribute.strategy=mirrored", "distribute.logical_cpus=2"]),
                 ("2 local workers x 1 replica, float32", ["launch-local", args.recipe, "--workers", "2"], []),
                 ("1 device, mixed_bfloat16", ["pretrain", args.recipe], ["train.precision=mixed_bfloat16"])]
        for i, (label, command, extra) in enumerate(cases):
            rows.append(run(label, command, os.path.join(tmp, str(i)), sets + extra))
            print(f"  done: {label}", flush=True)
    base = rows[0]["img_s"]
    print(f"\n{args.recipe}, backbone {args.backbone}, global batch {args.batch}, {args.steps} steps x {args.epochs} "
          f"epochs, XLA off; last-epoch training images/s\n")
    print(f"| configuration | replicas | img/s | ratio to 1 device | final loss | job wall s |")
    print(f"|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['replicas']} | {r['img_s']:.1f} | {r['img_s'] / base:.2f} | {r['loss']:.4f} | "
              f"{r['wall']:.0f} |")


if __name__ == "__main__":
    main()
