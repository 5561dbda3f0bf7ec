"""End to end, tfssl against PyTorch: each method's Fashion-MNIST recipe trained for a fixed number of steps through the
real ``tfssl pretrain`` path (data pipeline, views, train step, callbacks) and through the same algorithm written in
PyTorch (bench/torch_end_to_end.py: same data, views, network, heads, loss, optimiser), alternating the two.

    python bench/end_to_end.py --quick                     # ReSSL and WCL, short: ≤ 3 minutes
    python bench/end_to_end.py [--methods ressl,wcl,csml,simclr,mocov2] [--steps 60] [--repeats 2]
    python bench/end_to_end.py --emulate avx2              # an AVX-512 CPU capped at AVX2 (oneDNN, XLA, ATen)

Each run is a fresh process: epoch 1 (tracing, compilation, oneDNN primitive creation) is not timed, epoch 2 is
(tfssl: the ``epoch_images_per_second`` of its summary; PyTorch: its second epoch). Both use every core this process
may use, and the precision the recipe resolves to here (``train.precision: auto`` → bf16 on a bf16 CPU, PyTorch
then runs under ``torch.autocast(bfloat16)``). One line per method: ``METHOD tfssl_img_s T torch_img_s P ratio R``
(medians over the repeats), after the CPU flags, threads and tfssl's device plan (XLA, kernels, precision).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
METHODS = ("ressl", "wcl", "csml", "simclr", "mocov2")
EMULATE = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
                    "ATEN_CPU_CAPABILITY": "avx2"}}


def env_for(emulate):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    env.update(EMULATE.get(emulate, {}))
    return env


def recipe_overrides(steps, batch):
    return [f"data.limit={steps * batch}", "data.test_limit=256", "eval.knn_train_limit=256", "train.epochs=2",
            f"train.steps_per_epoch={steps}", "train.knn_every=0", "train.verbose=0", "train.resume=false"]


def tfssl_summary(method, sets, env):
    """The summary.json of one fresh ``tfssl pretrain`` run of ``method``'s recipe with ``sets`` overrides."""
    with tempfile.TemporaryDirectory(prefix="tfssl-e2e-") as work:
        cmd = [sys.executable, "-m", "tfssl", "pretrain", f"{method}_fashion_mnist", "--workdir", work]
        cmd += sum((["--set", s] for s in sets), [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise SystemExit(f"tfssl {method} failed:\n{out.stderr[-3000:]}")
        return json.load(open(os.path.join(work, "summary.json")))


def run_tfssl(method, sets, env):
    summary = tfssl_summary(method, sets, env)
    return summary["history"]["epoch_images_per_second"][-1], summary["train_plan"]


def sweep(key, settings, methods, repeats, run, unit="runs"):
    """Fresh runs of each method under every value of the recipe key ``key``, alternated ABBA (no setting always
    runs first, so a drift of the machine falls on all alike). ``run(method, setting)`` gives (img/s figures, plan
    label). Prints each run, then per setting the median, min, max and how many figures were *slow* (below 0.85 ×
    the median of all the method's figures: tfssl's slow mode, bench/NOTES.md §7g–7k)."""
    for method in methods:
        rates = {s: [] for s in settings}
        for r in range(repeats):
            for s in (settings if r % 2 == 0 else settings[::-1]):
                got, label = run(method, s)
                rates[s] += got
                print(f"  {method} {key}={s} (plan: {label}): {' '.join(f'{x:.0f}' for x in got)} img/s", flush=True)
        everything = statistics.median([x for v in rates.values() for x in v])
        for s, v in rates.items():
            slow = sum(x < 0.85 * everything for x in v)
            print(f"{method} {key}={s} median {statistics.median(v):.0f} min {min(v):.0f} max {max(v):.0f} "
                  f"slow {slow}/{len(v)} {unit}")


def run_torch(cfg_dict, steps, env):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "torch_end_to_end.py"), json.dumps(cfg_dict),
                          str(steps)], env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"PyTorch {cfg_dict['method']['name']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=None, help="comma list (default: all five; --quick: ressl,wcl)")
    p.add_argument("--steps", type=int, default=None, help="steps per epoch (default 60; --quick 20)")
    p.add_argument("--repeats", type=int, default=None, help="alternating runs per framework (default 2; quick 1)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--emulate", choices=sorted(EMULATE), default=None, help="cap the ISA of every library")
    p.add_argument("--set", action="append", default=[], help="extra recipe override (both frameworks)")
    args = p.parse_args()
    methods = (args.methods or ("ressl,wcl" if args.quick else ",".join(METHODS))).split(",")
    steps = args.steps or (20 if args.quick else 60)
    repeats = args.repeats or (1 if args.quick else 2)
    from tfssl import config
    from tfssl.devices import cpu_flags, detect
    env = env_for(args.emulate)
    device = detect(environ=env)
    cores = len(os.sched_getaffinity(0))
    flags = " ".join(f for f in ("fma", "avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in device.flags)
    print(f"CPU: {device.describe()} (flags {flags}; this machine: "
          f"{'avx512' if 'avx512f' in cpu_flags() else 'avx2'}), {cores} threads per framework, {steps} steps of "
          f"the recipe's batch timed (epoch 2) per run, {repeats} alternating run(s)", flush=True)
    rows = []
    for method in methods:
        cfg = config.load(f"{method}_fashion_mnist", args.set)
        sets = recipe_overrides(steps, cfg.train.batch_size) + list(args.set)
        cfg = config.load(f"{method}_fashion_mnist", sets)
        ours, theirs, plan = [], [], None
        for _ in range(repeats):
            rate, plan = run_tfssl(method, sets, env)
            ours.append(rate)
            d = cfg.to_dict()
            d["method"]["name"] = method
            d["train"]["precision"] = plan["precision"]
            theirs.append(run_torch(d, steps, env)["images_per_second"])
        t, q = statistics.median(ours), statistics.median(theirs)
        rows.append((method, t, q))
        print(f"  [{method}] tfssl: {plan['jit'] and 'XLA' or 'graph'}, conv {plan['conv']}, BN {plan['batch_norm']}, "
              f"{plan['precision']}; runs tfssl {[round(x) for x in ours]} torch {[round(x) for x in theirs]} img/s",
              flush=True)
    print()
    for method, t, q in rows:
        print(f"{method} tfssl_img_s {t:.1f} torch_img_s {q:.1f} ratio {t / q:.2f}")


if __name__ == "__main__":
    main()
