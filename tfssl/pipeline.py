"""The input pipelines of pretraining: batches of views from a :class:`tfssl.data.Source`.

* :func:`epoch_pipeline`: one epoch of batches fixed by (seed, epoch), for sources with random access (in-memory
  arrays, image folders, small TFDS sets): a seeded permutation per pass and stateless views seeded by the step, so a
  resumed run reads exactly what an uninterrupted one would have (tfssl/resume.py).
* :func:`pair_pipeline`: CsMl's anchor/neighbour pairs with CutMix, on the same scheme.
* :func:`stream_pipeline`: an endless shuffled stream for sources without random access (large TFDS sets).
* :func:`for_replicas`: let ``tf.distribute`` split finished global batches over replicas.
* :func:`with_autotune`: tf.data's autotuner on or off for a whole pipeline (the device plan's choice).
* :func:`train_pipeline`: a plain shuffled, batched stream (tests, tools).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfssl.data import AUTOTUNE, DataError, indexed

_NO_END = np.iinfo(np.int64).max   # an endless stream's range


def train_pipeline(ds, batch_size, views=None, seed=None, shuffle_buffer=10000, repeat=True, start_step=0):
    """Shuffle, repeat, batch (drop remainder: static shapes for XLA/TPU) and, if given, make the views in-pipeline.

    Yields ``{"image", "label"}`` batches, or ``{"views": tuple, "label"}`` when ``views`` (a
    :class:`tfssl.views.Views`) runs here instead of on the device. Scheduled views (a warm-up recipe) get the
    training step of each batch: batch k is step ``start_step + k`` (one batch per step, as ``model.fit`` reads).
    """
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=True)
    if views is not None and getattr(views, "scheduled", False):
        ds = ds.enumerate(start=start_step).map(
            lambda step, e: {"views": views(e["image"], step=step), "label": e["label"]},
            num_parallel_calls=AUTOTUNE, deterministic=seed is not None)
    elif views is not None:
        ds = ds.map(lambda e: {"views": views(e["image"]), "label": e["label"]}, num_parallel_calls=AUTOTUNE,
                    deterministic=seed is not None)
    return ds.prefetch(AUTOTUNE)


def _step_seed(seed, step, stream=0):
    """The stateless seed [2] of the views of training step ``step`` (``stream`` tells apart several draws)."""
    base = tf.stack([tf.constant(int(seed or 0), tf.int64), tf.cast(step, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, stream) if stream else base


def _epoch_elements(n, batch_size, steps, epoch, seed, endless=False):
    """Dataset of (global element index g, training image index i): one epoch of ``steps`` batches when ``epoch``
    (an int64 host variable, read when the iterator starts producing) is given, else an endless stream from g=0;
    ``endless`` with ``epoch``: an endless stream from the start of the epoch ``epoch`` holds when the iterator
    starts (read once), i.e. the epochs one after another in one iterator.

    Pass p = g // n visits every image once, in the seeded permutation ``index_shuffle(g mod n, (seed, p))``: the
    order of any step is known without replaying the ones before, so a resumed run reads what an uninterrupted one
    would have read.
    """
    per_epoch = steps * batch_size if epoch is not None else _NO_END
    seed = int(seed or 0)

    def element(g):
        key = tf.stack([tf.constant(seed, tf.int64), g // n])
        return g, tf.random.experimental.index_shuffle(g % n, key, n - 1)
    if epoch is None:
        return tf.data.Dataset.range(_NO_END).map(element, AUTOTUNE, deterministic=True)
    if endless:
        g = tf.data.Dataset.range(1).flat_map(   # flat_map's function runs once, when the iterator starts
            lambda _: tf.data.Dataset.range(tf.cast(epoch.read_value(), tf.int64) * per_epoch, _NO_END))
        g = g.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
        return g.map(element, AUTOTUNE, deterministic=True)
    return tf.data.Dataset.range(per_epoch).map(lambda k: element(tf.cast(epoch.read_value(), tf.int64) * per_epoch
                                                                  + k), AUTOTUNE, deterministic=True)


def _step(g, batch_size):
    """The training step of a batch from its elements' global indices ``g`` [B]: batch b of epoch e holds
    g = e·steps·B + b·B …, so g[0] // B = e·steps + b (the step ``model.fit`` runs it at)."""
    return g[0] // batch_size


def epoch_pipeline(source, batch_size, steps, epoch=None, views=None, seed=0, views_parallelism=None,
                   endless=False):
    """Pretraining batches that depend only on (``seed``, epoch): images in a seeded permutation per pass over the
    data (:func:`_epoch_elements`) read through ``source.lookup``, views drawn with the stateless seed (seed, step).

    ``epoch``: an int64 ``tf.Variable`` on the host that the job sets at each epoch start (``callbacks.EpochVariable``);
    the dataset then yields that epoch's ``steps`` batches and ``model.fit`` makes a new iterator every epoch.
    ``endless=True`` (what pretraining uses): one iterator for the whole run, starting at the epoch ``epoch`` holds
    when ``model.fit`` opens it and running on across epochs (``fit(steps_per_epoch=steps)``), the same batches as
    one iterator per epoch without re-opening the pipeline every epoch (0.2-0.6 s each, bench/NOTES.md §7m).
    ``epoch=None``: an endless stream from step 0. Yields ``{"image", "label"}`` or, with ``views``,
    ``{"views", "label"}``. ``views_parallelism``: batches of views made at once (the device plan's,
    :mod:`tfssl.devices`); None: AUTOTUNE.
    """
    ds = _epoch_elements(source.num_train, batch_size, steps, epoch, seed, endless)
    if source.originals:
        return _originals_epoch(source, ds, batch_size, views, seed, views_parallelism)
    lookup = indexed(source)
    if views is None:
        ds = ds.map(lambda g, i: lookup(i), AUTOTUNE, deterministic=True).batch(batch_size, drop_remainder=True)
        return ds.prefetch(AUTOTUNE)
    ds = ds.map(lambda g, i: (g, lookup(i)), AUTOTUNE, deterministic=True).batch(batch_size, drop_remainder=True)

    def make_views(g, e):
        step = _step(g, batch_size)
        return {"views": views(e["image"], step=step, seed=_step_seed(seed, step)), "label": e["label"]}
    return ds.map(make_views, views_parallelism or AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def _crops(views, image, g, batch_size, seed, stream=0):
    """The per-image crops of every view of element ``g`` (its original ``image``): seeded by (data seed, g), so the
    same element of the same epoch gets the same boxes after a resume; ``stream`` tells apart images of a pair."""
    return views.crop_stage(image, seed=_step_seed(seed, g, stream + 17), step=g // batch_size)


def _originals_epoch(source, elements, batch_size, views, seed, views_parallelism=None):
    """:func:`epoch_pipeline` for a source of originals (image folders): each view's RandomResizedCrop is made per
    image on the decoded original (any size and aspect), the rest of the views on the batch of crops."""
    if views is None:
        raise DataError(f"{source.name}: views on the device need images of one size, but this source crops its "
                        f"originals in the input pipeline; set augment.on_device=false (or data.originals=false to "
                        f"resize every image to data.image_size first)")
    lookup = source.lookup_original

    def element(g, i):
        e = lookup(i)
        return g, {"crops": _crops(views, e["image"], g, batch_size, seed), "label": e["label"]}

    def make_views(g, e):
        step = _step(g, batch_size)
        return {"views": views.after_crop(e["crops"], step=step, seed=_step_seed(seed, step)), "label": e["label"]}
    ds = elements.map(element, AUTOTUNE, deterministic=True).batch(batch_size, drop_remainder=True)
    return ds.map(make_views, views_parallelism or AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def pair_pipeline(source, table, views, batch_size, mix, seed=0, steps=None, epoch=None, views_parallelism=None):
    """CsMl's batches (METHODS.md CsMl 2–3): every anchor i with a neighbour j drawn uniformly from ``table[i]``.

    ``table`` is the int32 [N, k] neighbour table (a host ``tf.Variable``; the :class:`tfssl.mining.NeighbourMiner`
    rewrites it at an epoch start, before that epoch's iterator reads it). Anchors, draws, views and the CutMix box
    depend only on (``seed``, element / step index), as in :func:`epoch_pipeline` (``steps``/``epoch`` likewise).
    ``views`` makes a (query, key) pair of each image; ``mix(q_anchor, q_neighbour, seed) → (mixed, λ′)`` is CsMl's
    CutMix, one box per global batch.
    Yields ``{"views": (q_i, k_i, q_j, k_j, q_mix, λ′ per row [B]), "label": anchor labels}``, or with
    ``views=None`` (views on the device) ``{"anchor", "neighbour", "label"}`` uint8 batches.
    ``views_parallelism`` as in :func:`epoch_pipeline`.
    """
    originals = source.originals and views is not None
    lookup = source.lookup_original if originals else indexed(source)
    n, k = int(table.shape[0]), int(table.shape[1])
    if n != source.num_train:
        raise DataError(f"the neighbour table has {n} rows but {source.name} has {source.num_train} training images")
    if epoch is not None and not steps:
        raise ValueError("pair_pipeline: epoch needs steps (batches per epoch)")
    seed = int(seed or 0)

    def pair(g, i):
        draw = tf.random.stateless_uniform([], tf.stack([tf.constant(seed, tf.int64), g]), 0, k, tf.int64)
        j = tf.cast(tf.gather(table[i], draw), tf.int64)
        a, b = lookup(i), lookup(j)
        if originals:                           # image folders: crop the originals per image, here
            return g, {"anchor": _crops(views, a["image"], g, batch_size, seed, 1),
                       "neighbour": _crops(views, b["image"], g, batch_size, seed, 2), "label": a["label"]}
        return g, {"anchor": a["image"], "neighbour": b["image"], "label": a["label"]}

    def make_views(g, e):
        step = _step(g, batch_size)
        if originals:
            qi, ki = views.after_crop(e["anchor"], step=step, seed=_step_seed(seed, step, 1))[:2]
            qj, kj = views.after_crop(e["neighbour"], step=step, seed=_step_seed(seed, step, 2))[:2]
        else:
            qi, ki = _call_views(views, e["anchor"], _step_seed(seed, step, 1))[:2]
            qj, kj = _call_views(views, e["neighbour"], _step_seed(seed, step, 2))[:2]
        qm, lam = mix(qi, qj, _step_seed(seed, step))
        return {"views": (qi, ki, qj, kj, qm, tf.fill([batch_size], lam)), "label": e["label"]}

    ds = _epoch_elements(n, batch_size, steps or 1, epoch, seed).map(pair, AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    if views is None:
        return ds.map(lambda g, e: e).prefetch(AUTOTUNE)
    return ds.map(make_views, views_parallelism or AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def stream_pipeline(ds, batch_size, steps, epoch, views=None, seed=0, shuffle_buffer=10000, originals_ds=None,
                    views_parallelism=None):
    """Pretraining batches of a source without random access (a large TFDS dataset): an endless shuffled stream.

    The stream starts at the epoch held by the host variable ``epoch`` when ``model.fit`` first reads it, with a
    shuffle seeded by (``seed``, that epoch); the views use the stateless seed (seed, step) as in
    :func:`epoch_pipeline`. A resumed run therefore gets a fresh seeded order (statistically the same, not the
    bit-identical batches of an uninterrupted run, which needs random access: in-memory or image-folder sources).
    ``originals_ds``: the decoded originals of a source whose views crop them (ImageNet from TFDS), used instead of
    ``ds`` with per-image crops as in :func:`epoch_pipeline`; ``views_parallelism`` likewise.
    """
    seed = int(seed or 0)
    originals = originals_ds is not None and views is not None

    def from_epoch(_):
        e = tf.cast(epoch.read_value(), tf.int64)
        source = originals_ds if originals else ds
        stream = source.shuffle(shuffle_buffer, seed=seed * 1000003 + e, reshuffle_each_iteration=True).repeat()
        if originals:                           # crops of the originals, per image, seeded by its stream position
            stream = stream.enumerate(start=e * steps * batch_size).map(
                lambda g, x: {"crops": _crops(views, x["image"], g, batch_size, seed), "label": x["label"]},
                AUTOTUNE, deterministic=True)
        return stream.batch(batch_size, drop_remainder=True).enumerate(start=e * steps)

    def make(step, e):
        if views is None:
            return e
        if originals:
            return {"views": views.after_crop(e["crops"], step=step, seed=_step_seed(seed, step)),
                    "label": e["label"]}
        return {"views": views(e["image"], step=step, seed=_step_seed(seed, step)), "label": e["label"]}
    return (tf.data.Dataset.range(1).flat_map(from_epoch).map(make, views_parallelism or AUTOTUNE, deterministic=True)
            .prefetch(AUTOTUNE))


def for_replicas(ds, batch_size, steps=None):
    """Let ``tf.distribute`` split *finished* global batches over replicas. It rewrites the pipeline's last
    ``batch`` to the per-replica size; views drawn per global batch (seed = step) would then be drawn per replica
    batch instead, unlike a one-device run. Un-batching and re-batching after the views makes that last ``batch``
    a plain regrouping: replica r gets rows r·B/R … (r+1)·B/R − 1 of the same global batch as on one device."""
    finite = int(ds.cardinality()) > 0
    ds = ds.unbatch().batch(batch_size, drop_remainder=True)
    if finite and steps:
        ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    return ds.prefetch(AUTOTUNE)


def with_autotune(ds, enabled):
    """``ds`` with tf.data's autotuner on or off (``train.data_autotune``, decided per CPU kind in
    :mod:`tfssl.devices`). Off, every AUTOTUNE parallelism is one call per core and AUTOTUNE prefetch buffers
    grow only when the consumer waits; the batches are the same either way."""
    options = tf.data.Options()
    options.autotune.enabled = bool(enabled)
    return ds.with_options(options)


def _call_views(views, images, seed):
    """``views(images, seed=seed)`` for :class:`tfssl.views.Views`; plain callables get the images only."""
    from tfssl.views import Views
    return views(images, seed=seed) if isinstance(views, Views) else views(images)
