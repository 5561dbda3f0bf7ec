"""The pretraining job: config → strategy → data → views → method → ``model.fit`` → kNN/probe → summary.json.

Everything the job writes lives in ``workdir``: ``config.yaml`` (resolved recipe), ``checkpoints/last.weights.h5``
(every epoch, atomic), ``tensorboard/`` (losses, lr, momentum, probe, kNN, z_std, collapse monitors ``emb_*``) and
``summary.json``.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from tfssl import __version__, callbacks, config, data, distribute, methods, pipeline, resume
from tfssl.eval.knn import embed
from tfssl.eval.monitors import CollapseMonitor
from tfssl.optim import SGD, build_optimizer


def write_json(path, obj):
    """Write JSON via a temp file and rename (no half-written summaries)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def update_summary(workdir, **entries):
    """Merge ``entries`` into ``workdir/summary.json`` (created if missing)."""
    path = os.path.join(workdir, "summary.json")
    summary = json.load(open(path)) if os.path.exists(path) else {}
    summary.update(entries)
    write_json(path, summary)
    return summary


def plan_steps(cfg, num_train):
    """steps per epoch: ``train.steps_per_epoch`` or one pass over the (limited) training set."""
    steps = cfg.train.steps_per_epoch or num_train // cfg.train.batch_size
    if steps < 1:
        raise config.ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the {num_train} training "
                                 f"images; lower train.batch_size or raise data.limit")
    return steps


def pretrain(cfg: config.Config, workdir: str, log=print):
    """Run the pretraining described by ``cfg`` and return the summary dict (also written to summary.json)."""
    from tensorflow.python.framework import config as tf_config    # no public way to read or undo the flag
    if cfg.train.deterministic and cfg.train.jit_compile is True:
        raise config.ConfigError("train.deterministic=true and train.jit_compile=true: Keras compiles no XLA step "
                                 "under TensorFlow's deterministic ops; set train.jit_compile=auto (or false) or "
                                 "train.deterministic=false")
    keras.utils.set_random_seed(cfg.train.seed)
    was_deterministic = tf_config.is_op_determinism_enabled()
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    try:                                     # the flag is process-wide: a later run in this process starts clean
        return _pretrain(cfg, workdir, log)
    finally:
        if cfg.train.deterministic and not was_deterministic:
            tf_config.disable_op_determinism()


def _pretrain(cfg, workdir, log):
    strategy = distribute.make_strategy(cfg.distribute)
    replicas = strategy.num_replicas_in_sync
    if cfg.train.batch_size % replicas:
        raise config.ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the {replicas} "
                                 f"replicas")
    source = data.load_source(cfg.data)
    steps = plan_steps(cfg, source.num_train)
    backup = os.path.join(workdir, "backup")  # every worker restores from it; only the chief writes it
    chief = distribute.is_chief(strategy)
    if not chief:                            # other workers write into a scratch directory, removed at the end
        scratch = tempfile.mkdtemp(prefix="tfssl-worker-")
        try:
            return _run(cfg, scratch, log, strategy, source, steps, backup, chief)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return _run(cfg, workdir, log, strategy, source, steps, backup, chief)


def _run(cfg, workdir, log, strategy, source, steps, backup_dir, chief=True):
    """:func:`pretrain` once strategy and data are known: writes into ``workdir``, runs in ``train.precision``."""
    replicas = strategy.num_replicas_in_sync
    total = steps * cfg.train.epochs
    log(f"tfssl {__version__}: {type(cfg.method).method_name} on {source.name} ({source.num_train} train / "
        f"{source.num_test} held-out images, {source.skipped_corrupt} corrupt skipped), backbone "
        f"{cfg.model.backbone}, {cfg.train.epochs} epochs × {steps} steps, batch {cfg.train.batch_size} on "
        f"{replicas} replica(s) [{distribute.strategy_name(strategy)}]")

    views = methods.views_for(cfg, steps)        # augmentation stays float32
    plan = distribute.train_plan(cfg.train.jit_compile, cfg.train.kernels, cfg.train.precision, strategy,
                                 cfg.train.views_parallelism, cfg.train.data_autotune)
    log(f"train step: {plan.describe()}")
    previous_policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(plan.precision)   # layers built now compute in it
    try:
        return _fit(cfg, workdir, log, strategy, source, steps, total, views, backup_dir, chief, plan)
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)


def _fit(cfg, workdir, log, strategy, source, steps, total, views, backup_dir, chief, plan):
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model = methods.build(cfg, source.num_classes, source.mean, source.std, total,
                              on_device_views=views if cfg.augment.on_device else None, steps_per_epoch=steps)
        model.compile(build_optimizer(cfg.train, total, steps),
                      probe_optimizer=SGD(cfg.train.probe_lr, momentum=0.9, name="probe_sgd"),
                      jit_compile=plan.jit)
    if cfg.augment.on_device and plan.jit:   # an op without an XLA kernel: one clear error, before any training
        model.check_views_compile(cfg.augment.size)
    os.makedirs(workdir, exist_ok=True)      # only once the recipe, data and step are known to be usable
    config.dump(cfg, os.path.join(workdir, "config.yaml"))
    with tf.device("/cpu:0"):                # read by the input pipeline at every epoch start
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")
    batches = model.make_pipeline(source, views, cfg, steps, epoch, views_parallelism=plan.views_parallelism)
    if replicas > 1:
        batches = pipeline.for_replicas(batches, cfg.train.batch_size, steps)
    batches = pipeline.with_autotune(batches, plan.data_autotune)
    if distribute.is_multi_worker(strategy):    # every worker builds the global batch and keeps its rows
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        batches = batches.with_options(options)

    job_cbs = model.job_callbacks(source, cfg, log)   # before job_state: CsMl's miner holds its history
    host_variables, job_state = model.job_state()
    backup = resume.Backup(backup_dir, cfg.to_dict(), host_variables, job_state, write=chief, log=log)
    initial_epoch, records = backup.restore(model) if cfg.train.resume else (0, {})
    model.load_job_state(records)
    spent = (backup.history.get("train_seconds") or [0.0])[-1]      # training time of earlier attempts
    done = os.path.join(workdir, "summary.json")
    budget_spent = cfg.train.max_minutes is not None and spent >= 60.0 * cfg.train.max_minutes
    if (initial_epoch >= cfg.train.epochs or budget_spent) and os.path.exists(done):
        log(f"resume: all {cfg.train.epochs} epochs of this run are done; summary.json is unchanged" if not
            budget_spent else f"resume: train.max_minutes={cfg.train.max_minutes:g} was reached; summary.json is "
            f"unchanged")
        with open(done) as f:
            return json.load(f)
    timer = callbacks.Throughput(cfg.train.batch_size, offset=spent)
    cbs = [callbacks.EpochVariable(epoch), timer, callbacks.StopOnNonFinite(cfg.train.on_nan == "skip", log)]
    if cfg.train.max_minutes is not None:
        cbs.append(callbacks.TimeBudget(cfg.train.max_minutes, timer, log))
    cbs += job_cbs
    knn = None
    if source.test is not None and source.num_classes:
        bank = source.labelled.take(cfg.eval.knn_train_limit) if cfg.eval.knn_train_limit else source.labelled
        knn = callbacks.KNNMonitor(data.eval_pipeline(bank, 256), data.eval_pipeline(source.test, 256),
                                   source.num_classes, cfg.eval.knn_k, cfg.eval.knn_temperature,
                                   cfg.train.knn_every, cfg.train.epochs, timer=timer)
        cbs.append(knn)
    if source.test is not None:   # collapse monitors (emb_std, emb_effective_rank, …); before TensorBoard
        cbs.append(CollapseMonitor(data.eval_pipeline(source.test, 256), every=cfg.train.knn_every, batches=8,
                                   views=lambda x: views(x)[:2]))
    checkpoint = callbacks.AtomicCheckpoint(os.path.join(workdir, "checkpoints"))
    cbs += [backup, checkpoint, keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard"), write_graph=False)]

    start = time.perf_counter()
    epoch.assign(initial_epoch)        # where an endless pipeline starts (EpochVariable sets it again, per epoch)
    finite = int(batches.cardinality()) > 0           # one epoch per iterator (CsMl); else one endless iterator
    model.fit(batches, initial_epoch=initial_epoch, epochs=cfg.train.epochs,
              steps_per_epoch=None if finite else steps, callbacks=cbs, verbose=cfg.train.verbose, shuffle=False)
    wall = time.perf_counter() - start

    history = backup.history                         # every epoch of the run, over restarts
    figures = {k: float(v[-1]) for k, v in history.items()}
    if source.test is not None and model.probe is not None:
        feats, labels = embed(model.backbone, data.eval_pipeline(source.test, 256))
        figures["probe_top1"] = float(np.mean(np.argmax(model.probe(feats).numpy(), 1) == labels))
    if knn is not None and knn.last:
        figures["knn_top1"], figures["knn_top5"] = knn.last["top1"], knn.last["top5"]
    summary = update_summary(
        workdir, method=type(cfg.method).method_name, dataset=source.name, backbone=cfg.model.backbone,
        strategy=distribute.strategy_name(strategy), replicas=replicas, epochs=cfg.train.epochs, steps=total,
        steps_per_epoch=steps, epochs_done=len(history.get("loss", [])), train_seconds=timer.total_seconds,
        batch_size=cfg.train.batch_size, num_train=source.num_train,
        skipped_corrupt=source.skipped_corrupt, images_per_second=timer.images_per_second, wall_seconds=wall,
        knn_top1=figures.get("knn_top1"), knn_top5=figures.get("knn_top5"), probe_top1=figures.get("probe_top1"),
        probe_train_top1=figures.get("probe_acc"), final_loss=figures.get("loss"),
        history={k: [float(x) for x in v] for k, v in history.items()}, resumed_from_epoch=backup.restored_epoch,
        checkpoint=checkpoint.path, train_plan=plan.as_dict(), **model.job_summary(),
        versions={"tfssl": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
                  "python": platform.python_version()})
    return summary
