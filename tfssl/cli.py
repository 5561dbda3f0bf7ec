"""The ``tfssl`` command: the only place that reads argv and prints tables."""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_RECIPE = "ressl_fashion_mnist"
SET_HELP = ("override a recipe key, repeatable: --set train.epochs=5 --set data.limit=2000 "
            "(values are YAML: numbers, true/false, [lists])")


def _parser():
    p = argparse.ArgumentParser(prog="tfssl", description="Self-supervised visual representation learning "
                                "(ReSSL, WCL, SimCLR, MoCo v2; CsMl to come) with Keras 3 / TensorFlow.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = sub.add_parser("pretrain", help="pretrain a backbone, then report kNN and probe accuracy",
                         description="Pretrain with a YAML recipe; writes config.yaml, checkpoints/, tensorboard/ "
                         "and summary.json into --workdir and prints the kNN/probe accuracy.")
    pre.add_argument("config", nargs="?", default=DEFAULT_RECIPE,
                     help=f"recipe path or name in configs/ (default: {DEFAULT_RECIPE})")
    pre.add_argument("--workdir", default=None, help="output directory (default: runs/<recipe name>)")
    pre.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)

    ev = sub.add_parser("eval", help="evaluate a pretrained run (knn now; linear, semi, plot to come)",
                        description="Evaluate the backbone of a finished run in --workdir.")
    ev.add_argument("protocol", choices=["knn", "linear", "semi", "plot"])
    ev.add_argument("--workdir", required=True, help="a run directory written by `tfssl pretrain`")
    ev.add_argument("--checkpoint", default=None, help="weights file (default: WORKDIR/checkpoints/last.weights.h5)")
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


def _eval(args):
    if args.protocol != "knn":
        sys.exit(f"tfssl eval {args.protocol}: not available yet (evaluation suite, issue #6); `tfssl eval knn` works")
    from tfssl import config, data, methods
    from tfssl.eval.knn import embed, knn_accuracy
    from tfssl.train import update_summary
    cfg = config.load(os.path.join(args.workdir, "config.yaml"), args.set)
    ckpt = args.checkpoint or os.path.join(args.workdir, "checkpoints", "last.weights.h5")
    if not os.path.isfile(ckpt):
        raise config.ConfigError(f"checkpoint not found: {ckpt}; run `tfssl pretrain` with --workdir {args.workdir}")
    source = data.load_source(cfg.data)
    model = methods.build(cfg, source.num_classes, source.mean, source.std)
    model.load_weights(ckpt)
    bank, bank_y = embed(model.backbone, data.eval_pipeline(source.train, 256))
    test, test_y = embed(model.backbone, data.eval_pipeline(source.test, 256))
    res = knn_accuracy(bank, bank_y, test, test_y, source.num_classes, cfg.eval.knn_k, cfg.eval.knn_temperature)
    update_summary(args.workdir, knn={"checkpoint": ckpt, "k": cfg.eval.knn_k, **res})
    print(_table([(f"kNN top-1 (k={cfg.eval.knn_k}, τ={cfg.eval.knn_temperature})", _pct(res["top1"])),
                  ("kNN top-5", _pct(res["top5"]))]))


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


def main(argv=None):
    args = _parser().parse_args(argv)
    from tfssl.config import ConfigError
    from tfssl.data import DataError
    from tfssl.callbacks import NonFiniteLoss
    from tfssl.export import ExportError
    from tfssl.zoo import ZooError
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
    except (ConfigError, DataError, NonFiniteLoss, ExportError, ZooError) as e:
        print(f"tfssl {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
