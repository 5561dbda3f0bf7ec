"""The ``tfssl`` command: the only place that reads argv and prints tables."""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_RECIPE = "ressl_fashion_mnist_quick"
SET_HELP = ("override a recipe key, repeatable: --set train.epochs=5 --set data.limit=2000 "
            "(values are YAML: numbers, true/false, [lists])")


def _parser():
    p = argparse.ArgumentParser(prog="tfssl", description="Self-supervised visual representation learning "
                                "(ReSSL, WCL, CsMl, SimCLR, MoCo v2) with Keras 3 / TensorFlow.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = sub.add_parser("pretrain", help="pretrain a backbone, then report kNN and probe accuracy",
                         description="Pretrain with a YAML recipe; writes config.yaml, checkpoints/, tensorboard/ "
                         "and summary.json into --workdir and prints the kNN/probe accuracy.")
    pre.add_argument("config", nargs="?", default=DEFAULT_RECIPE,
                     help=f"recipe path or name in configs/ (default: {DEFAULT_RECIPE})")
    pre.add_argument("--workdir", default=None, help="output directory (default: runs/<recipe name>)")
    pre.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)

    ev = sub.add_parser("eval", help="offline evaluation: knn, linear, semi, plot; report prints them all",
                        description="Evaluate the backbone of a run in --workdir (its checkpoint, an exported "
                        "backbone, or a baseline) and store the figures in WORKDIR/summary.json under "
                        "eval.<protocol>.<subject>. Quick runs: --set eval.epochs=5 --set data.limit=2000.")
    ev.add_argument("protocol", choices=["knn", "linear", "semi", "plot", "report"],
                    help="knn: weighted k=200 + majority k=20 kNN and collapse monitors; linear: linear probe on "
                    "frozen features; semi: fine-tuning on 1%%/10%% labels; plot: t-SNE, retrieval grid, projector; "
                    "report: print every stored figure, online and offline, side by side")
    ev.add_argument("--workdir", required=True, help="a run directory written by `tfssl pretrain`")
    what = ev.add_mutually_exclusive_group()
    what.add_argument("--checkpoint", default=None, help="weights file (default: WORKDIR/checkpoints/last.weights.h5)")
    what.add_argument("--backbone", default=None, help="an exported backbone instead: export dir, .keras, SavedModel "
                      "dir or .onnx (written by `tfssl export`)")
    what.add_argument("--baseline", default=None, choices=["random_init", "pixels"],
                      help="evaluate a reference instead: the untrained backbone or the raw pixels")
    ev.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)

    ex = sub.add_parser("export", help="export the backbone to SavedModel / ONNX / .keras with a model card",
                        description="Export the backbone of a run (not heads or teacher), verify parity of every "
                        "format against Keras, write model_card.json and README.md; nothing is left on failure.")
    ex.add_argument("--workdir", required=True, help="a run directory written by `tfssl pretrain`")
    ex.add_argument("--checkpoint", default=None, help="weights file (default: WORKDIR/checkpoints/last.weights.h5)")
    ex.add_argument("--out", required=True, help="export directory (must be new or empty, or use --overwrite)")
    ex.add_argument("--formats", default=None, help="comma list of savedmodel,onnx,keras (default: the recipe's)")
    ex.add_argument("--input-size", type=int, default=None, help="side of the parity images (default: recipe's)")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")

    zo = sub.add_parser("zoo", help="model-zoo manifest: list, add an export, verify a download",
                        description="The manifest export/zoo.json lists exported backbones with their hashes.")
    zo.add_argument("action", choices=["list", "add", "verify"])
    zo.add_argument("path", nargs="?", help="add: export directory; verify: downloaded file or directory")
    zo.add_argument("--name", default=None, help="entry name (add: required; verify: restrict to this entry)")
    zo.add_argument("--location", default=None, help="add: where the files live (default: path relative to manifest)")
    zo.add_argument("--replace", action="store_true", help="add: replace an existing entry of that name")
    zo.add_argument("--manifest", default=None, help="manifest file (default: export/zoo.json of this checkout)")

    ll = sub.add_parser("launch-local", help="pretrain with N local worker processes (MultiWorkerMirroredStrategy)",
                        description="Start N `tfssl pretrain` worker processes on this machine, each with a TF_CONFIG "
                        "naming 127.0.0.1 free ports (worker 0 is the chief and writes --workdir), and wait for all; "
                        "a failing worker stops the others. For trying multi-worker training before a cluster.")
    ll.add_argument("config", nargs="?", default=DEFAULT_RECIPE, help="recipe path or name in configs/")
    ll.add_argument("--workers", type=int, default=2, help="number of worker processes (default: 2)")
    ll.add_argument("--workdir", default=None, help="output directory (default: runs/<recipe name>)")
    ll.add_argument("--timeout", type=float, default=None, help="stop every worker after this many seconds")
    ll.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)

    pv = sub.add_parser("preview", help="write a PNG grid of images and their views",
                        description="Show what a recipe's views look like: one row per image, original first.")
    pv.add_argument("config", help="recipe path or name in configs/")
    pv.add_argument("--out", default="preview.png", help="PNG path (default: preview.png)")
    pv.add_argument("--count", type=int, default=8, help="number of images (rows)")
    pv.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)
    return p


def _table(rows):
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _pretrain(args):
    from tfssl import config
    from tfssl.train import pretrain
    cfg = config.load(args.config, args.set)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    s = pretrain(cfg, workdir)
    print(f"\nResult ({s['method']} on {s['dataset']}, {s['epochs']} epochs, {s['steps']} steps) — {workdir}")
    print(_table([("kNN top-1 (k=%d, held-out)" % cfg.eval.knn_k, _pct(s["knn_top1"])),
                  ("kNN top-5", _pct(s["knn_top5"])), ("online probe top-1 (held-out)", _pct(s["probe_top1"])),
                  ("final loss", f"{s['final_loss']:.4f}"), ("images/s (training)", f"{s['images_per_second']:.1f}"),
                  ("wall time", f"{s['wall_seconds']:.0f} s")]))
    if cfg.eval.baselines and s.get("knn_top1") is not None and _chief(cfg):
        _baselines(workdir, cfg)


def _chief(cfg):
    """Whether this process writes the run (the chief under multi-worker; always otherwise)."""
    from tfssl import distribute
    return cfg.distribute.strategy != "multi_worker" or distribute.is_chief()


def _baselines(workdir, cfg):
    """``eval.baselines``: the protocols on the trained backbone, a random-init backbone and raw pixels, run (or
    found in summary.json) and printed side by side, so the gain of pretraining shows on the same screen."""
    from tfssl.eval import protocols
    print(f"\nOffline evaluation ({', '.join(cfg.eval.baselines)}) of this backbone beside its baselines, same "
          f"protocol and split:")
    rows = {}
    for subject in protocols.COMPARED:
        evals = protocols.ensure(workdir, cfg.eval.baselines, subject,
                                 done=lambda p, t, who=subject: print(f"  {p} on {who} done in {t:.0f} s"))
        h = protocols.headline(evals, subject)
        cells = {f"kNN weighted (k={cfg.eval.knn_k}, τ={cfg.eval.knn_temperature:g}) top-1": h["knn_weighted"],
                 f"kNN majority (k={cfg.eval.majority_k}) top-1": h["knn_majority"],
                 f"linear probe ({cfg.eval.linear_preset}) top-1": h["linear"],
                 **{f"fine-tuned on {100 * f:g}% labels top-1": v for f, v in sorted(h["semi"].items())}}
        for label, value in cells.items():
            if value is not None:
                rows.setdefault(label, {})[subject] = value
    head = {"checkpoint": "this backbone", "random_init": "random init", "pixels": "raw pixels"}
    width = max(len(k) for k in rows)
    print("  " + " " * width + "".join(f"  {h:>13}" for h in head.values()))
    for label, by_subject in rows.items():
        print(f"  {label:<{width}}" + "".join(f"  {_pct(by_subject.get(s)):>13}" for s in head))


def _eval_rows(protocol, r):
    if protocol == "knn":
        w, m, q = r["weighted"], r["majority"], r["quality"]
        return [(f"kNN weighted (k={w['k']}, τ={w['temperature']}) top-1 / top-5",
                 f"{_pct(w['top1'])} / {_pct(w['top5'])}"),
                (f"kNN majority (k={m['k']}) top-1 / top-5", f"{_pct(m['top1'])} / {_pct(m['top5'])}"),
                ("feature std (1/√D reference)", f"{q['std']:.4f} ({q['std_reference']:.4f})"),
                ("effective rank", f"{q['effective_rank']:.1f}"),
                ("alignment / uniformity", f"{q['alignment']:.4f} / {q['uniformity']:.4f}")]
    if protocol == "linear":
        return [("linear top-1 / top-5 (last epoch)", f"{_pct(r['top1'])} / {_pct(r['top5'])}"),
                ("best validation epoch (val top-1)", f"{r.get('best_val_epoch')} ({_pct(r.get('best_val_top1'))})"),
                ("test top-1 of the best-validation head", _pct(r.get("test_top1_at_best_val")))]
    if protocol == "semi":
        name = lambda k: k.replace(" + pseudo", " labels + pseudo") if "pseudo" in k else k + " labels"
        return [(f"fine-tuned on {name(k)} ({v['labelled']} images, {v['epochs']} ep) top-1 / top-5",
                 f"{_pct(v['top1'])} / {_pct(v['top5'])}"
                 + (f"  (pseudo-labels {v['pseudo_labelled']}, {_pct(v['pseudo_accuracy'])} correct; "
                    f"round 1 {_pct(v['first_round']['top1'])})" if "first_round" in v else ""))
                for k, v in r.items() if isinstance(v, dict)]
    return [("t-SNE", r["tsne"]), ("retrieval grid", r["retrieval"]),
            ("TensorBoard images + projector", r["tensorboard"])]


def _report(workdir):
    """One row per figure, one column per evaluated subject (checkpoint, baselines, exported backbones)."""
    path = os.path.join(workdir, "summary.json")
    if not os.path.isfile(path):
        from tfssl.eval.protocols import EvalError
        raise EvalError(f"no summary.json in {workdir}; run `tfssl pretrain` / `tfssl eval` there first")
    s = json.load(open(path))
    cells = {"online probe top-1 (during pretraining)": {"checkpoint": _pct(s.get("probe_top1"))},
             "online kNN top-1 (during pretraining)": {"checkpoint": _pct(s.get("knn_top1"))}}
    subjects = ["checkpoint"]
    for protocol, by_subject in s.get("eval", {}).items():
        for subject, r in by_subject.items():
            if protocol == "plot":
                continue
            subjects += [subject] if subject not in subjects else []
            for k, v in _eval_rows(protocol, r):
                cells.setdefault(k.split(" (")[0] + " top-1 / top-5" if protocol == "semi" else k, {})[subject] = v
    width = max(len(k) for k in cells)
    cols = [max(len(c), *(len(r.get(c, "")) for r in cells.values())) for c in subjects]
    print(f"Evaluation of {workdir} ({s.get('method')} on {s.get('dataset')}); offline unless marked online")
    print("  " + " " * width + "".join(f"  {c:<{w}}" for c, w in zip(subjects, cols)))
    for k, r in cells.items():
        print(f"  {k:<{width}}" + "".join(f"  {r.get(c, '—'):<{w}}" for c, w in zip(subjects, cols)))


def _eval(args):
    if args.protocol == "report":
        return _report(args.workdir)
    from tfssl.eval import protocols
    subject = protocols.open_subject(args.workdir, args.checkpoint, args.backbone, args.baseline, args.set)
    print(f"tfssl eval {args.protocol}: {subject.name} ({subject.origin}) on {subject.source.name}, "
          f"{subject.source.num_train} train / {subject.source.num_test} held-out images")
    fn = protocols.PROTOCOLS[args.protocol]
    result = fn(subject) if args.protocol in ("knn", "plot") else fn(subject, log=print)
    protocols.record(subject, args.protocol, result)
    print(_table(_eval_rows(args.protocol, result)))


def _export(args):
    from tfssl.export import export_run
    kw = {"overwrite": args.overwrite}
    if args.formats:
        kw["formats"] = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    if args.input_size:
        kw["input_size"] = args.input_size
    card = export_run(args.workdir, args.out, checkpoint=args.checkpoint, **kw)
    print(f"exported {card['training'].get('method')} {card['training'].get('backbone')} backbone to {args.out}")
    print(_table([(f, f"{v['max_abs']:.1e} abs, {v['max_rel']:.1e} rel") for f, v in card["parity"].items()]
                 + [(p, f"{m['bytes']} bytes  sha256 {m['sha256'][:16]}…") for p, m in card["files"].items()
                    if "/" not in p]))


def _zoo(args):
    from tfssl import zoo
    manifest = args.manifest or zoo.MANIFEST
    if args.action == "list":
        models = zoo.read_manifest(manifest)["models"]
        rows = [(n, f"{e['training'].get('method')} {e['training'].get('backbone')} on {e['training'].get('dataset')}"
                    f"  {json.dumps(e.get('evaluation', {}))}  at {e['location']}") for n, e in sorted(models.items())]
        print(_table(rows) if rows else f"no models in {manifest}")
        return
    if not args.path:
        raise zoo.ZooError(f"tfssl zoo {args.action} needs a path")
    if args.action == "add":
        if not args.name:
            raise zoo.ZooError("tfssl zoo add needs --name")
        e = zoo.add(args.path, args.name, manifest, location=args.location, replace=args.replace)
        print(f"added {args.name} ({len(e['files'])} files) to {manifest}")
    else:
        print(f"ok: {args.path} matches zoo entry {zoo.verify(args.path, args.name, manifest)!r}")


def _launch_local(args):
    from tfssl import config
    from tfssl.launch import launch_local
    if args.workers < 1:
        raise config.ConfigError(f"--workers must be at least 1, got {args.workers}")
    config.load(args.config, args.set)                   # a bad recipe fails here once, not in every worker
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    argv = ["pretrain", args.config, "--workdir", workdir] + sum((["--set", s] for s in args.set), [])
    code = launch_local(argv, workers=args.workers, timeout=args.timeout)
    if code == 0:
        print(f"launch-local: {args.workers} workers done; results in {workdir}")
    return code


def main(argv=None):
    args = _parser().parse_args(argv)
    from tfssl.config import ConfigError
    from tfssl.data import DataError
    from tfssl.callbacks import NonFiniteLoss
    from tfssl.export import ExportError
    from tfssl.zoo import ZooError
    from tfssl.eval.protocols import EvalError
    try:
        if args.command == "pretrain":
            _pretrain(args)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "preview":
            from tfssl import config
            from tfssl.preview import preview
            print(f"wrote {preview(config.load(args.config, args.set), args.out, args.count)}")
        elif args.command == "export":
            _export(args)
        elif args.command == "zoo":
            _zoo(args)
        elif args.command == "launch-local":
            return _launch_local(args)
    except (ConfigError, DataError, NonFiniteLoss, ExportError, ZooError, EvalError) as e:
        print(f"tfssl {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
