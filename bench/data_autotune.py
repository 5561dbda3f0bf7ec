"""tf.data's autotuner on the pretraining pipeline or not (``train.data_autotune``), epoch by epoch.

Fresh ``tfssl pretrain`` processes of each method's Fashion-MNIST recipe (bench/end_to_end.py's short runs, here
with several epochs), the settings alternated run by run (ABBA); every epoch after the first is timed, because the
slow mode of bench/NOTES.md §7g–7k comes and goes per epoch inside one process:

    python bench/data_autotune.py [--methods ressl] [--epochs 8] [--repeats 2] [--emulate avx2]

Prints each run's epoch img/s, then per method and setting the median, min, max and how many epochs were *slow*
(below 0.85 × the median of all the method's epochs). The winner per CPU kind goes into
``tfssl.devices.CPU_AUTOTUNE``.
"""
from __future__ import annotations

import argparse
import os

from end_to_end import env_for, recipe_overrides, sweep, tfssl_summary


def run_epochs(method, sets, env):
    """img/s of every epoch after the first of one fresh ``tfssl pretrain`` run, and its device plan."""
    summary = tfssl_summary(method, sets, env)
    return summary["history"]["epoch_images_per_second"][1:], summary["train_plan"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="ressl", help="comma list of recipes (default ressl)")
    p.add_argument("--settings", default="true,false", help="comma list of train.data_autotune values")
    p.add_argument("--epochs", type=int, default=8, help="epochs per run (the first is not timed)")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting, alternated")
    p.add_argument("--steps", type=int, default=20, help="steps per epoch")
    p.add_argument("--emulate", choices=["avx2"], default=None, help="cap the CPU at AVX2 (oneDNN, XLA)")
    args = p.parse_args()
    from tfssl import config
    from tfssl.devices import detect
    env = env_for(args.emulate)
    device = detect(environ=env)
    flags = " ".join(f for f in ("fma", "avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in device.flags)
    print(f"CPU: {device.describe()} (flags {flags}), {os.cpu_count()} cores", flush=True)
    def run(method, setting):
        batch = config.load(f"{method}_fashion_mnist").train.batch_size
        sets = [s for s in recipe_overrides(args.steps, batch) if not s.startswith("train.epochs=")]
        rates, plan = run_epochs(method, sets + [f"train.epochs={args.epochs}", f"train.data_autotune={setting}"], env)
        return rates, "on" if plan["data_autotune"] else "off"
    sweep("data_autotune", args.settings.split(","), args.methods.split(","), args.repeats, run, unit="epochs")

if __name__ == "__main__":
    main()
