"""How many batches of views the input pipeline should make at once on this CPU (``train.views_parallelism``).

Fresh ``tfssl pretrain`` processes of a method's Fashion-MNIST recipe (the runs of bench/end_to_end.py: epoch 2
timed), alternating the settings run by run so that a drift of the machine falls on all of them alike:

    python bench/views_parallelism.py [--methods ressl] [--settings autotune,1] [--repeats 8] [--emulate avx2]

Prints every run's epoch-2 images/s, then per setting the median, min, max and how many runs were *slow* (below
0.85 × the median of all runs of the method): tfssl's slow mode (bench/NOTES.md §7g–7i) shows as such outliers,
not as a shift of the median. The winner per CPU kind goes into ``tfssl.devices.CPU_VIEWS``.
"""
from __future__ import annotations

import argparse

from end_to_end import env_for, recipe_overrides, run_tfssl, sweep


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="ressl", help="comma list of recipes (default ressl)")
    p.add_argument("--settings", default="autotune,1", help="comma list of train.views_parallelism values")
    p.add_argument("--repeats", type=int, default=8, help="runs per setting, alternated")
    p.add_argument("--steps", type=int, default=20, help="steps per epoch")
    p.add_argument("--emulate", choices=["avx2"], default=None, help="cap the CPU at AVX2 (oneDNN, XLA)")
    args = p.parse_args()
    from tfssl import config
    from tfssl.devices import detect
    env = env_for(args.emulate)
    device = detect(environ=env)
    flags = " ".join(f for f in ("fma", "avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in device.flags)
    print(f"CPU: {device.describe()} (flags {flags})", flush=True)
    def run(method, setting):
        batch = config.load(f"{method}_fashion_mnist").train.batch_size
        rate, plan = run_tfssl(method, recipe_overrides(args.steps, batch) + [f"train.views_parallelism={setting}"],
                               env)
        return [rate], plan.get("views_parallelism") or "AUTOTUNE"
    sweep("views_parallelism", args.settings.split(","), args.methods.split(","), args.repeats, run)

if __name__ == "__main__":
    main()
