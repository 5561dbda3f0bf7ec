"""Representation quality on Fashion-MNIST: what each method's recipe learns, beside raw pixels and a random init.

For every method in ``--methods`` (default: all five) the harness trains the method's Fashion-MNIST recipe
(``configs/<method>_fashion_mnist.yaml``) on the **full standard split** (60 000 train, 10 000 test: no
``data.limit``), then runs the same offline protocols on three subjects — the trained backbone, the same backbone
untrained (``random_init``, same seed) and the raw pixels — with the recipe's evaluation settings:

* weighted kNN (k = 200, τ = 0.1) and majority kNN (k = 20), bank = the 60 000 training images;
* the linear probe (``eval.linear_preset``, validation split carved from train, last-epoch test figure);
* fine-tuning on 1 % and 10 % of the labels (``tfssl eval semi``).

It writes ``OUT/results.json`` (every figure, the online figures of pretraining labelled as such, training
minutes and images/s, CPU flags, the command of each row), ``OUT/results.md`` (the table) and ``OUT/knn_curve.png``
(held-out weighted kNN accuracy of the online monitor against training minutes, one line per method, raw pixels as
a horizontal line). Each run lives in ``OUT/<method>/``: run the same command again after a kill and pretraining
resumes from its last backup (tfssl's exact resume); protocols already recorded in a run's summary.json are not
run again. ``--minutes M`` stops a method's pretraining after M minutes of training (the schedule keeps the
recipe's epochs). The table accumulates across calls: a call replaces the rows of the methods it runs and keeps the
others (with the date and CPU flags they were measured with), so each method can be run on its own, with its own
``--set``, and its row names that command. ``--quick`` is a few-minute smoke run (2 048 training images, 1 epoch,
short protocols).

    python bench/quality.py --quick
    python bench/quality.py                      # the full run (hours on 2 CPU cores)
    python bench/quality.py --methods ressl,wcl --minutes 30
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("ressl", "wcl", "csml", "simclr", "mocov2")
PROTOCOLS = ("knn", "linear", "semi")
SUBJECTS = ("trained", "random_init", "pixels")
SUBJECTS_KIND = {"trained": "checkpoint", "random_init": "random_init", "pixels": "pixels"}
QUICK = ["data.limit=2048", "data.test_limit=1000", "train.epochs=1", "eval.knn_train_limit=2048",
         "eval.epochs=3", "eval.semi_fractions=[0.05]", "train.knn_every=1"]
FULL = ["data.limit=null", "data.test_limit=null", "eval.knn_train_limit=null"]


def cpu_flags():
    from tfssl.devices import cpu_flags as flags
    keep = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma")
    return " ".join(f for f in keep if f in flags())


def overrides(method, args):
    return list(QUICK if args.quick else FULL) + list(args.set or [])


def command(method, args):
    parts = ["python bench/quality.py", f"--methods {method}"] + (["--quick"] if args.quick else [])
    parts += [f"--minutes {args.minutes:g}"] if args.minutes else []
    parts += [f"--set {s}" for s in args.set or []]
    parts += [f"--protocols {','.join(args.protocols)}"] if tuple(args.protocols) != PROTOCOLS else []
    return " ".join(parts)


def pretrain(method, workdir, args, log):
    """Train the method's recipe in ``workdir``, or resume it, or find it finished; returns summary.json."""
    from tfssl import config, train
    sets = overrides(method, args) + ([f"train.max_minutes={args.minutes:g}"] if args.minutes else [])
    return train.pretrain(config.load(f"{method}_fashion_mnist", sets), workdir, log=log)


def baseline_key(workdir, subject_kind):
    """What a baseline's figures depend on: the data and evaluation sections (and, for a random-init backbone, the
    model section and the seed) of the run's resolved recipe. Methods whose recipes agree there share them."""
    import yaml
    cfg = yaml.safe_load(open(os.path.join(workdir, "config.yaml")))
    parts = {"data": cfg["data"], "eval": {k: v for k, v in cfg["eval"].items() if k != "baselines"}}
    if subject_kind == "random_init":              # the backbone's own keys (the heads are not evaluated)
        parts.update(model={k: v for k, v in cfg["model"].items() if not k.startswith("projector")},
                     seed=cfg["train"]["seed"])
    return json.dumps(parts, sort_keys=True)


def borrow(workdir, subject_kind, wanted, log):
    """Copy a baseline's recorded figures from another method's run of this harness with the same
    :func:`baseline_key` (raw pixels and a random-init backbone are computed once, not once per method)."""
    from tfssl.train import update_summary
    path = os.path.join(workdir, "summary.json")
    mine = json.load(open(path)).get("eval", {})
    if all(subject_kind in mine.get(p, {}) for p in wanted):
        return
    key, out = baseline_key(workdir, subject_kind), os.path.dirname(workdir)
    for other in sorted(os.listdir(out)):
        there = os.path.join(out, other)
        if there == workdir or not os.path.isfile(os.path.join(there, "summary.json")) or not os.path.isfile(
                os.path.join(there, "config.yaml")) or baseline_key(there, subject_kind) != key:
            continue
        theirs = json.load(open(os.path.join(there, "summary.json"))).get("eval", {})
        found = [p for p in wanted if subject_kind in theirs.get(p, {}) and subject_kind not in mine.get(p, {})]
        for p in found:
            mine.setdefault(p, {})[subject_kind] = {**theirs[p][subject_kind], "borrowed_from": other}
        if found:
            update_summary(workdir, eval=mine)
            log(f"quality: {os.path.basename(workdir)} {subject_kind} {', '.join(found)} from {other} (same data, "
                f"evaluation{' and backbone' if subject_kind == 'random_init' else ''} settings)")


def evaluate(workdir, subject_kind, log, wanted=PROTOCOLS):
    """Run the missing protocols of ``wanted`` on one subject (checkpoint | random_init | pixels), borrowing a
    baseline's figures from another method's identical setting first; returns summary["eval"]
    (:func:`tfssl.eval.protocols.ensure`)."""
    from tfssl.eval import protocols
    if subject_kind != "checkpoint":
        borrow(workdir, subject_kind, wanted, log)
    return protocols.ensure(workdir, wanted, subject_kind, done=lambda p, t: log(
        f"quality: {os.path.basename(workdir)} {subject_kind} {p} done in {t:.0f} s"))


def row(eval_, subject):
    """(weighted kNN, majority kNN, linear, 1 %, 10 %) top-1 of one subject."""
    from tfssl.eval import protocols
    h = protocols.headline(eval_, subject)
    fraction = lambda f: next((v for k, v in h["semi"].items() if abs(k - f) < 1e-9), None)   # noqa: E731
    return {"knn_weighted": h["knn_weighted"], "knn_majority": h["knn_majority"], "linear": h["linear"],
            "semi_1pct": fraction(0.01), "semi_10pct": fraction(0.1), "semi": {f"{100 * k:g}%": v for k, v in
                                                                                h["semi"].items()}}


def pct(x):
    return "—" if x is None else f"{100 * x:.1f}"


def split(quick):
    return "quick smoke run (2 048 train / 1 000 test)" if quick else "full split (60 000 train / 10 000 test)"


def kept(out, methods, quick):
    """The rows, curves and raw-pixel kNN of methods that an earlier call wrote to ``OUT/results.json`` and this call
    does not run: the table accumulates across calls (each method can be run with its own ``--set``), and a method's
    rows are replaced when it is run again. Rows of the other split (--quick or not) are not kept."""
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        return [], {}, None
    old = json.load(open(path))
    if old.get("meta", {}).get("split") != split(quick):
        return [], {}, None
    rows = [{"date": old["meta"].get("date"), "cpu_flags": old["meta"].get("cpu_flags"), **r}
            for r in old.get("results", []) if r["method"] not in methods]
    curves = {r["method"]: tuple(r["curve"]) for r in rows if r["subject"] == "trained" and r.get("curve")}
    pixels = [r["knn_weighted"] for r in rows if r["subject"] == "pixels"]
    return rows, curves, pixels[-1] if pixels else None


def write_outputs(out, results, meta):
    results = [{"date": meta["date"], "cpu_flags": meta["cpu_flags"], **r} for r in results]
    with open(os.path.join(out, "results.json.tmp"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))
    head = ["method", "subject", "kNN w (k=200)", "kNN maj (k=20)", "linear", "1 % labels", "10 % labels",
            "train min", "img/s", "online kNN", "online probe"]
    lines = [f"Fashion-MNIST, {meta['split']}; offline protocols unless marked online; {meta['date']}, "
             f"{meta['cpu']} ({meta['cpu_flags']}), TensorFlow {meta['tensorflow']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([r["method"], r["subject"], pct(r["knn_weighted"]), pct(r["knn_majority"]),
                                         pct(r["linear"]), pct(r["semi_1pct"]), pct(r["semi_10pct"]),
                                         "—" if r.get("train_minutes") is None else f"{r['train_minutes']:.1f}",
                                         "—" if r.get("images_per_second") is None else
                                         f"{r['images_per_second']:.0f}",
                                         pct(r.get("online_knn")), pct(r.get("online_probe"))]) + " |")
    other = sorted({(r.get("date"), r.get("cpu_flags")) for r in results} - {(meta["date"], meta["cpu_flags"])})
    for o in other:                   # a method whose trained row is newer than its baselines names only those
        group = [r for r in results if (r.get("date"), r.get("cpu_flags")) == o]
        trained = sorted({r["method"] for r in group if r["subject"] == "trained"})
        baselines = sorted({r["method"] for r in group} - set(trained))
        names = ", ".join(trained + ([f"the baselines of {', '.join(baselines)}"] if baselines else []))
        lines.append(f"Rows of {names} were measured on {o[0]} with CPU flags ({o[1]}).")
    lines += ["", "Reproduce a row: " + "; ".join(f"`{r['command']}`" for r in results if r["subject"] ==
                                                   "trained")]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(out, curves, pixel_knn):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, (minutes, acc) in curves.items():
        if minutes:
            ax.plot(minutes, [100 * a for a in acc], marker="o", label=method)
    if pixel_knn is not None:
        ax.axhline(100 * pixel_knn, color="gray", linestyle="--", label="raw pixels")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("held-out weighted kNN top-1 (%)  [online monitor]")
    ax.set_title("Fashion-MNIST: kNN accuracy during pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "knn_curve.png")
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ",".join(METHODS))
    p.add_argument("--minutes", type=float, default=None, help="stop each method's pretraining after this much "
                   "training time (the recipe's schedule is kept)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2048 images, 1 epoch, short protocols")
    p.add_argument("--out", default=None, help="output directory (default runs/quality or runs/quality_quick)")
    p.add_argument("--set", action="append", default=[], help="extra recipe override for every method")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma list of " + ",".join(PROTOCOLS))
    p.add_argument("--subjects", default=",".join(SUBJECTS), help="comma list of " + ",".join(SUBJECTS) +
                   " (a recipe trial: --subjects trained --protocols knn,linear)")
    args = p.parse_args(argv)
    methods, args.protocols, subjects = ([x.strip() for x in text.split(",") if x.strip()]
                                         for text in (args.methods, args.protocols, args.subjects))
    for given, valid, what in ((methods, METHODS, "method"), (args.protocols, PROTOCOLS, "protocol"),
                               (subjects, SUBJECTS, "subject")):
        bad = [x for x in given if x not in valid]
        if bad or not given:
            p.error(f"unknown or no {what}(s) {bad}; choose from {', '.join(valid)}")
    out = args.out or os.path.join("runs", "quality_quick" if args.quick else "quality")
    os.makedirs(out, exist_ok=True)
    import tfssl  # noqa: F401  (first: it sets TensorFlow's C++ log level, else every epoch prints Grappler warnings)
    import tensorflow as tf
    log = lambda msg: print(msg, flush=True)   # noqa: E731
    results, curves, pixel_knn = kept(out, methods, args.quick)
    for method in methods:
        workdir = os.path.join(out, method)
        t = time.perf_counter()
        summary = pretrain(method, workdir, args, log)
        log(f"quality: {method} pretrained: {summary['epochs_done']} epochs, {summary['train_seconds'] / 60:.1f} "
            f"training minutes ({time.perf_counter() - t:.0f} s in this call)")
        for subject in (SUBJECTS_KIND[s] for s in subjects):
            evals = evaluate(workdir, subject, log, args.protocols)
            r = row(evals, subject)
            r.update(method=method, subject={"checkpoint": "trained"}.get(subject, subject),
                     command=command(method, args))
            if subject == "checkpoint":
                r.update(train_minutes=summary["train_seconds"] / 60, online_knn=summary.get("knn_top1"),
                         online_probe=summary.get("probe_top1"), images_per_second=summary.get("images_per_second"),
                         backbone=summary.get("backbone"), epochs=summary["epochs_done"],
                         precision=summary.get("train_plan", {}).get("precision"))
            if subject == "pixels":
                pixel_knn = r["knn_weighted"]
            results.append(r)
        h = summary.get("history", {})
        curves[method] = ([s / 60 for s in h.get("knn_train_seconds", [])], h.get("knn_top1", []))
        meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
                "cpu_flags": cpu_flags(), "tensorflow": tf.__version__, "split": split(args.quick)}
        for r in results:
            if r["method"] == method:
                r.update(date=meta["date"], cpu_flags=meta["cpu_flags"])
                if r["subject"] == "trained":
                    r["curve"] = list(curves[method])
        write_outputs(out, results, meta)
        plot(out, curves, pixel_knn)
    log(f"quality: wrote {os.path.join(out, 'results.md')}, results.json and knn_curve.png")
    print(open(os.path.join(out, "results.md")).read())


if __name__ == "__main__":
    main()
