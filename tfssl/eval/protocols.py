"""The evaluation protocols as ``tfssl eval`` runs them on a run directory (METHODS.md, "Evaluation protocols").

:func:`open_subject` loads what is evaluated — the run's checkpoint (default), an exported backbone
(``--backbone PATH``: export dir, ``.keras``, SavedModel or ``.onnx``), or a baseline (``random_init``: the
recipe's backbone untrained, same seed; ``pixels``: the flattened images in [0, 1]) — with the run's recipe and
data. :func:`run_knn`, :func:`run_linear`, :func:`run_semi` and :func:`run_plot` return JSON-ready dicts;
:func:`record` stores one under ``summary.json["eval"][protocol][subject]``, beside the *online* figures of
pretraining (``probe_top1``, ``knn_top1``), which are never overwritten: online and offline numbers stay apart.

Frozen features are cached per (weights SHA-256, split, data settings) in ``WORKDIR/eval_cache`` so the kNN,
linear and plot protocols embed a checkpoint once.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import keras
import numpy as np

from tfssl import config, data, methods
from tfssl.eval import linear, monitors, plots, semi
from tfssl.eval.features import cached_embed, file_sha256, load_backbone
from tfssl.eval.knn import knn_report

BASELINES = ("random_init", "pixels")


class EvalError(ValueError):
    """A protocol cannot run on this run / backbone; the message names the fix."""


@dataclass
class Subject:
    """What is evaluated: ``backbone`` maps images in [0, 1] to features; ``keras_model`` is set when fine-tunable."""
    name: str                 # "checkpoint" | "random_init" | "pixels" | "backbone:<file name>"
    backbone: Any
    keras_model: Optional[keras.Model]
    key: str                  # identifies the weights for the feature cache
    origin: str               # checkpoint or backbone path, or a description
    cfg: config.Config
    source: data.Source
    workdir: str


def pixel_backbone(size, channels):
    """The raw-pixel baseline as a (weight-free) Keras model: images [N,size,size,C] → flattened pixels."""
    inputs = keras.Input((size, size, channels))
    return keras.Model(inputs, keras.layers.Flatten()(inputs), name="pixels")


def open_subject(workdir, checkpoint=None, backbone=None, baseline=None, overrides=()):
    """The :class:`Subject` of ``tfssl eval``: the run's recipe (``WORKDIR/config.yaml`` + ``--set`` overrides),
    its data, and one of checkpoint (default ``checkpoints/last.weights.h5``), ``backbone`` path, or ``baseline``."""
    if sum(x is not None for x in (checkpoint, backbone, baseline)) > 1:
        raise EvalError("pass at most one of --checkpoint, --backbone and --baseline")
    recipe = os.path.join(workdir, "config.yaml")
    if not os.path.isfile(recipe):
        raise EvalError(f"no config.yaml in {workdir}; pass the --workdir of a `tfssl pretrain` run (it names the "
                        f"data and protocol settings; an exported backbone is evaluated with --backbone PATH)")
    cfg = config.load(recipe, list(overrides))
    source = data.load_source(cfg.data)
    if source.test is None or not source.num_classes:
        raise EvalError(f"{source.name} has no labelled held-out split; set data.test_limit/data.test_path")
    if baseline is not None and baseline not in BASELINES:
        raise EvalError(f"--baseline {baseline!r} is not one of {', '.join(BASELINES)}")
    args = (cfg, source, workdir)
    if baseline == "pixels":
        net = pixel_backbone(cfg.data.image_size, cfg.data.channels)
        return Subject("pixels", net, net, "pixels", "raw pixels in [0, 1]", *args)
    if backbone is not None:
        if not os.path.exists(backbone):
            raise EvalError(f"--backbone {backbone}: no such file or directory")
        try:
            net = load_backbone(backbone)
        except ValueError as e:
            raise EvalError(str(e)) from None
        name = "backbone:" + os.path.basename(os.path.normpath(backbone))
        model = net if isinstance(net, keras.Model) else None
        return Subject(name, net, model, file_sha256(backbone)[:16], os.path.abspath(backbone), *args)
    keras.utils.set_random_seed(cfg.train.seed)     # random_init: the same untrained weights on every call
    model = methods.build(cfg, source.num_classes, source.mean, source.std)
    if baseline == "random_init":
        key = "random-" + hashlib.sha256(json.dumps(cfg.to_dict()["model"], sort_keys=True).encode()
                                         + str(cfg.train.seed).encode()).hexdigest()[:12]
        return Subject("random_init", model.backbone, model.backbone, key,
                       f"untrained {cfg.model.backbone} (seed {cfg.train.seed})", *args)
    checkpoint = checkpoint or os.path.join(workdir, "checkpoints", "last.weights.h5")
    if not os.path.isfile(checkpoint):
        raise EvalError(f"checkpoint not found: {checkpoint}; run `tfssl pretrain --workdir {workdir}` first or pass "
                        f"--checkpoint FILE")
    model.load_weights(checkpoint)
    return Subject("checkpoint", model.backbone, model.backbone, file_sha256(checkpoint)[:16],
                   os.path.abspath(checkpoint), *args)


def features(subject, split):
    """(features, labels) of ``split`` ("train" or "test") through the subject, cached in WORKDIR/eval_cache."""
    ds = subject.source.labelled if split == "train" else subject.source.test
    d = subject.cfg.data
    tag = hashlib.sha256(json.dumps([d.name, d.path, d.test_path, d.limit, d.test_limit, d.image_size, d.channels,
                                     d.seed, d.crop_size, d.originals, d.eval_split, d.test_split]).encode()
                         ).hexdigest()[:8]
    return cached_embed(subject.backbone, data.eval_pipeline(ds, subject.cfg.eval.batch_size),
                        os.path.join(subject.workdir, "eval_cache"), f"{subject.key}-{split}-{tag}")


def _views_features(subject, count=2048):
    """Features of two of the recipe's views of the first ``count`` held-out images (alignment pairs)."""
    views = methods.views_for(subject.cfg)
    images = next(iter(data.eval_pipeline(subject.source.test, count)))[0]
    pair = views(images)[:2]
    forward = (lambda x: subject.backbone(x, training=False)) if subject.keras_model is not None else subject.backbone
    return [np.asarray(forward(v)) for v in pair]


def run_knn(subject):
    """Weighted (k, τ of the recipe) and majority (``eval.majority_k``) kNN with the train split as bank, plus the
    collapse/quality monitors of the held-out features (std vs 1/√D, effective rank, uniformity, alignment)."""
    e = subject.cfg.eval
    bank, bank_y = features(subject, "train")
    test, test_y = features(subject, "test")
    result = knn_report(bank, bank_y, test, test_y, subject.source.num_classes, e.knn_k, e.knn_temperature,
                        e.majority_k)
    z1, z2 = _views_features(subject)
    result["quality"] = monitors.collapse_report(test, max_samples=4096)
    result["quality"]["alignment"] = monitors.alignment(z1, z2)
    result.update(bank_size=int(len(bank)), test_size=int(len(test)))
    return result


def run_linear(subject, log=None):
    """Linear probe: ``eval.linear_preset``'s settings — augmented views each epoch (the papers' presets) or cached
    frozen features (``small``; ``eval.linear_augment`` overrides) — ``eval.epochs`` if set, validation split from
    train."""
    e, src = subject.cfg.eval, subject.source
    kw = dict(preset=e.linear_preset, epochs=e.epochs, val_fraction=e.val_fraction, seed=e.seed, log=log)
    augment = linear.PRESETS[e.linear_preset]["augment"] if e.linear_augment is None else e.linear_augment
    if not augment:
        return linear.linear_probe(*features(subject, "train"), *features(subject, "test"), src.num_classes, **kw)
    if subject.keras_model is None and "onnx" in subject.origin:
        raise EvalError("eval.linear_augment=true needs a TensorFlow backbone; evaluate the export directory or "
                        "its backbone.keras instead of backbone.onnx")
    keras.utils.set_random_seed(e.seed)
    return linear.augmented_linear_probe(subject.backbone, data.eval_pipeline(src.labelled, e.batch_size),
                                         data.eval_pipeline(src.test, e.batch_size), src.num_classes,
                                         augment_preset=subject.cfg.augment.preset, size=subject.cfg.augment.size,
                                         **kw)


def semi_epochs(fraction, epochs=None):
    """Fine-tuning epochs: ``eval.epochs`` if set, else SimCLR's 60 for ≤ 1% labels and 30 above."""
    return epochs if epochs is not None else (60 if fraction <= 0.01 else 30)


def run_semi(subject, log=None):
    """Fine-tune backbone + head on each stratified ``eval.semi_fractions`` subset (seeded); top-1/top-5 on test."""
    e, cfg, src = subject.cfg.eval, subject.cfg, subject.source
    if subject.keras_model is None:
        raise EvalError(f"{subject.origin}: fine-tuning needs a Keras backbone; pass the export directory (it has "
                        f"backbone.keras) or the run's checkpoint")
    from tfssl.views import view
    augment = view("weak", cfg.augment.preset, cfg.augment.size)
    test = data.eval_pipeline(src.test, e.batch_size)
    out = {}
    for fraction in e.semi_fractions:
        images, labels = semi.labelled_subset(src.labelled, fraction, e.seed)
        kw = dict(augment=augment, epochs=semi_epochs(fraction, e.epochs), batch_size=e.semi_batch_size,
                  head_lr=e.semi_head_lr, backbone_lr=e.semi_head_lr * e.semi_backbone_ratio,
                  weight_decay=e.semi_weight_decay, seed=e.seed, log=log)
        if e.pseudo_label:
            res = semi.pseudo_label_finetune(subject.keras_model, images, labels, src.labelled, test,
                                             src.num_classes, fraction, entropy=e.pseudo_entropy, **kw)
        else:
            res = semi.finetune(subject.keras_model, images, labels, test, src.num_classes, **kw)
        key = f"{100 * fraction:g}%" + (" + pseudo-labels" if e.pseudo_label else "")
        out[key] = {"fraction": fraction, **res}
    return out


def run_plot(subject, out_dir=None):
    """t-SNE of held-out features by class, retrieval grid (``eval.retrieval_queries`` queries + top-8 among the
    held-out images), both as PNG and TensorBoard images, and embedding-projector files. Returns paths."""
    e = subject.cfg.eval
    slug = subject.name.replace(":", "_").replace("/", "_")
    out_dir = out_dir or os.path.join(subject.workdir, "eval", slug)
    test, test_y = features(subject, "test")
    keep = plots.subsample_indices(len(test), e.plot_limit, e.seed)
    images = np.concatenate([b["image"].numpy() for b in subject.source.test.batch(1024)])
    tsne, _ = plots.tsne_plot(test, test_y, os.path.join(out_dir, "tsne.png"), limit=e.plot_limit, seed=e.seed,
                              title=f"t-SNE of held-out features: {subject.name}", threads=1)
    grid, _ = plots.retrieval_grid(images[:e.retrieval_queries], images, test, test[:e.retrieval_queries],
                                   os.path.join(out_dir, "retrieval.png"), k=8, exclude_self=True,
                                   query_labels=test_y[:e.retrieval_queries], bank_labels=test_y)
    logdir = os.path.join(subject.workdir, "tensorboard", "eval", slug)
    tags = plots.log_images_to_tensorboard(logdir, f"eval/{slug}", [tsne, grid])
    projector = plots.write_projector(os.path.join(logdir, "projector"), test[keep], test_y[keep],
                                      sprite_images=images[keep])
    return {"tsne": tsne, "retrieval": grid, "tensorboard": logdir, "tensorboard_tags": tags,
            "projector": projector, "points": int(len(keep))}


PROTOCOLS = {"knn": run_knn, "linear": run_linear, "semi": run_semi, "plot": run_plot}
COMPARED = ("checkpoint", "random_init", "pixels")    # the subjects of a comparison: the run and its baselines


def ensure(workdir, protocols, subject="checkpoint", log=None, done=None):
    """Run on one subject of the run in ``workdir`` (``checkpoint``, ``random_init`` or ``pixels``) each protocol of
    ``protocols`` that its summary.json does not hold yet, and record it; returns summary.json's ``eval`` section.
    ``done(protocol, seconds)`` is told of each protocol run. What was recorded is not run again (a killed
    comparison resumes where it stopped)."""
    import time
    path = os.path.join(workdir, "summary.json")
    have = (json.load(open(path)) if os.path.isfile(path) else {}).get("eval", {})
    missing = [p for p in protocols if subject not in have.get(p, {})]
    if not missing:
        return have
    opened = open_subject(workdir, baseline=None if subject == "checkpoint" else subject)
    for protocol in missing:
        start = time.perf_counter()
        fn = PROTOCOLS[protocol]
        record(opened, protocol, fn(opened) if protocol == "knn" else fn(opened, log=log))
        if done is not None:
            done(protocol, time.perf_counter() - start)
    return json.load(open(path))["eval"]


def headline(evals, subject):
    """The top-1 figures of one subject a comparison shows: weighted kNN, majority kNN, linear, and each fine-tuning
    fraction (``semi``: {label fraction: top-1}); None where not run."""
    get = lambda p: evals.get(p, {}).get(subject, {})           # noqa: E731
    semi = {v["fraction"]: v["top1"] for k, v in get("semi").items() if isinstance(v, dict) and "fraction" in v
            and "pseudo" not in k}
    return {"knn_weighted": get("knn").get("weighted", {}).get("top1"),
            "knn_majority": get("knn").get("majority", {}).get("top1"), "linear": get("linear").get("top1"),
            "semi": semi}


def record(subject, protocol, result):
    """Merge ``result`` into ``summary.json["eval"][protocol][subject.name]`` (atomic rewrite; keys of earlier
    results that this one does not have, e.g. other label fractions, are kept); returns it."""
    from tfssl.train import update_summary
    path = os.path.join(subject.workdir, "summary.json")
    evals = (json.load(open(path)) if os.path.isfile(path) else {}).get("eval", {})
    by_subject = evals.setdefault(protocol, {})
    by_subject[subject.name] = {**by_subject.get(subject.name, {}), "origin": subject.origin, **result}
    update_summary(subject.workdir, eval=evals)
    return result
