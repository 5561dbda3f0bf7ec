"""Linear probe on a frozen backbone (METHODS.md, "Evaluation protocols" → Linear).

A single ``Dense`` layer (no BatchNorm, no hidden layer) is trained with softmax cross-entropy on the features of a
frozen backbone. Two paths:

* :func:`linear_probe` — the fast path: features computed once (``tfssl.eval.knn.embed``) and reused every epoch.
* :func:`augmented_linear_probe` — the paper path: every epoch sees fresh random-resized-crop + flip views
  (``tfssl.views.view("weak", …)``) pushed through the backbone in inference mode (``training=False``: BatchNorm
  uses and keeps its moving statistics; no backbone weight changes).

Honest reporting (no test-set model selection): a stratified validation split is carved from TRAIN
(:func:`split_validation`); the head is trained on the rest. Every epoch is scored on validation only. The test set
is scored twice at the end: the LAST-epoch head (``top1``/``top5``, the number papers report) and the head of the
epoch with the best validation top-1 (``test_top1_at_best_val``), each evaluated once. Test accuracy is never
computed per epoch, so nothing can be chosen on it. Accuracies are fractions in [0, 1], like ``knn_accuracy``.

Presets (:data:`PRESETS`), with what the papers used and where tfssl deviates:

* ``ressl`` / ``ressl_small`` / ``wcl`` — the official ``linear_eval.py`` of ReSSL (ImageNet; small datasets) and
  WCL, see :data:`PRESETS` for every setting and ``configs/README.md`` for the file and line of each.
* ``moco`` (= ``csml``) — MoCo v1/v2 ImageNet protocol (He et al. 2020; ``main_lincls.py`` of the MoCo code, kept
  by CsMl): SGD momentum 0.9, lr 30, batch 256, weight decay 0, 100 epochs, lr ×0.1 at epochs 60 and 80, raw
  (un-standardised) pooled features, random-resized-crop (0.08–1) + flip during training, centre crop at test.
  Same here except the head starts from zeros (MoCo: N(0, 0.01) weights) — irrelevant for a convex problem.
  The paper presets train on augmented views each epoch (``augment``: :func:`augmented_linear_probe`);
  ``eval.linear_augment: false`` runs them on cached features instead (quicker, not the paper's protocol).
* ``simclr`` — SimCLR linear evaluation as run by the official code (google-research/simclr README, ImageNet
  linear-head command; ``model_util.get_optimizer``): momentum optimizer with Nesterov, lr 0.1·B/256 (B = 4096 →
  1.6), cosine decay without warm-up, 90 epochs, weight decay 1e-6, zero-initialised logits layer, no BatchNorm on
  the head. The SimCLR code offers LARS for the head as well; plain Nesterov SGD is what its linear-eval command
  uses and what is implemented here (``optimizer="lars"`` remains available). Deviation: tfssl's SGD leaves the
  bias out of weight decay (SimCLR's momentum branch decays it too) — immaterial at 1e-6.
* ``small`` — tfssl's CPU / small-dataset setting (**not a paper protocol**): cached, unaugmented features,
  standardised (train-split mean and std; a fixed affine map that a linear head can absorb), SGD momentum 0.9 with
  Nesterov, lr 0.3·B/256 with B = 256, cosine to 0 over 100 epochs, weight decay 5e-4. It is tuned to reach the optimum of the convex problem:
  with coupled L2 it minimises mean cross-entropy + wd/2·‖W‖², the same objective as scikit-learn's
  ``LogisticRegression(C=1/(wd·n_train))``, and the tests check it lands within ±1 point of that fit.
"""
from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfssl.eval.knn import embed
from tfssl.optim import LARS, SGD, WarmupCosine, scaled_lr

_PAPER = dict(optimizer="sgd", momentum=0.9, weight_decay=0.0, standardize=False, augment=True, crop_scale=(0.08, 1.0))
PRESETS = {
    # ReSSL's ImageNet linear_eval.py: SGD m 0.9, lr 0.3, wd 0, cosine per iteration, 100 epochs, batch 256
    # (32 per GPU × 8), RandomResizedCrop(0.08–1) + flip
    "ressl": dict(_PAPER, lr=0.3, lr_scaling="none", nesterov=False, schedule="cosine", milestones=(), epochs=100,
                  batch_size=256),
    # ReSSL's small-dataset code (CIFAR, STL-10, Tiny-ImageNet) linear_eval.py: Nesterov, lr 0.2, otherwise as above
    "ressl_small": dict(_PAPER, lr=0.2, lr_scaling="none", nesterov=True, schedule="cosine", milestones=(), epochs=100,
                        batch_size=256),
    # WCL's linear_eval.py: Nesterov SGD (no LARS), lr 0.2·B/256 = 3.2 at B 4096, wd 0, cosine per iteration, 80 ep
    "wcl": dict(_PAPER, lr=0.2, lr_scaling="linear", nesterov=True, schedule="cosine", milestones=(), epochs=80,
                batch_size=4096),
    # MoCo's main_lincls.py, which CsMl's main_lincls.py keeps: lr 30, wd 0, batch 256, 100 epochs, ×0.1 at 60 and 80
    "moco": dict(_PAPER, lr=30.0, lr_scaling="none", nesterov=False, schedule="steps", milestones=(0.6, 0.8),
                 epochs=100, batch_size=256),
    "simclr": dict(optimizer="sgd", lr=0.1, lr_scaling="linear", momentum=0.9, nesterov=True, weight_decay=1e-6,
                   schedule="cosine", milestones=(), epochs=90, batch_size=4096, standardize=False, augment=True,
                   crop_scale=(0.08, 1.0)),
    # tfssl's quick protocol, NOT a paper's: cached unaugmented features, standardised, wd 5e-4 (see below)
    "small": dict(optimizer="sgd", lr=0.3, lr_scaling="linear", momentum=0.9, nesterov=True, weight_decay=5e-4,
                  schedule="cosine", milestones=(), epochs=100, batch_size=256, standardize=True, augment=False,
                  crop_scale=(0.2, 1.0)),
}
PRESETS["csml"] = PRESETS["moco"]
SCHEDULES = ("cosine", "steps", "constant")
OPTIMIZERS = ("sgd", "lars")


# ----------------------------------------------------------------------------------------------- validation split

def split_validation(labels, fraction=0.1, seed=0):
    """(train_idx, val_idx), sorted int64 arrays: a stratified, seeded validation split carved from TRAIN.

    The protocol (METHODS.md) chooses hyper-parameters and epochs on a split of train, never on test. Class c with
    n_c images gets floor(fraction·n_c) or one more validation images (largest remainders first, ties by class
    order), so every class is within one image of its share and the total is round(fraction·n); a class never
    gives up its last training image. The choice of images inside a class comes from ``seed``: the same labels and
    seed always give the same split. ``fraction=0`` gives (all indices, empty).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(labels)
    if fraction == 0 or n == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    share = fraction * counts
    take = np.floor(share).astype(np.int64)
    extra = int(round(fraction * n)) - int(take.sum())
    order = np.argsort(-(share - take), kind="stable")  # largest remainder first, ties by class order
    take[order[:max(0, extra)]] += 1
    take = np.minimum(take, counts - 1)
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    val = np.sort(np.concatenate(val)).astype(np.int64)
    mask = np.ones(n, bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), val


# ---------------------------------------------------------------------------------------------------- settings

def settings(preset, **overrides):
    """The resolved settings of a preset with ``overrides`` (None values keep the preset's)."""
    return _settings(preset, overrides)


def _settings(preset, overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown linear-probe preset {preset!r}; valid: {', '.join(PRESETS)}")
    s = dict(PRESETS[preset], preset=preset)
    s["crop_scale"] = tuple(s["crop_scale"])
    s.update({k: v for k, v in overrides.items() if v is not None})
    if s["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"unknown linear-probe optimizer {s['optimizer']!r}; valid: {', '.join(OPTIMIZERS)}")
    if s["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown linear-probe schedule {s['schedule']!r}; valid: {', '.join(SCHEDULES)}")
    if s["lr_scaling"] not in ("linear", "sqrt", "none"):
        raise ValueError(f"lr_scaling must be linear, sqrt or none, got {s['lr_scaling']!r}")
    if int(s["epochs"]) < 1 or int(s["batch_size"]) < 1:
        raise ValueError(f"epochs and batch_size must be ≥ 1, got {s['epochs']} and {s['batch_size']}")
    if any(not 0 < m < 1 for m in s["milestones"]):
        raise ValueError(f"milestones are fractions of the epochs in (0, 1), got {tuple(s['milestones'])}")
    s["epochs"], s["batch_size"] = int(s["epochs"]), int(s["batch_size"])
    s["milestones"] = tuple(float(m) for m in s["milestones"]) if s["schedule"] == "steps" else ()
    s["learning_rate"] = scaled_lr(float(s["lr"]), s["batch_size"], s["lr_scaling"])
    return s


def _check(features, labels, num_classes, name):
    """float32 features [N,D] and int64 labels [N]; ValueError naming the problem otherwise."""
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2:
        raise ValueError(f"{name} features must be [N, D], got shape {features.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{name} labels must be 1-D, got shape {labels.shape}")
    if len(features) != len(labels):
        raise ValueError(f"{name} features and labels differ in length: {len(features)} features, "
                         f"{len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"{name} set is empty")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"{name} labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"{name} labels must be in [0, {num_classes}) (num_classes={num_classes}); found "
                         f"{np.unique(labels[bad])[:10].tolist()} ({int(bad.sum())} rows; −1 = unlabelled)")
    features = features.astype(np.float32, copy=False)
    for start in range(0, len(features), 65536):               # chunked: no N×D temporary
        if not np.isfinite(features[start:start + 65536]).all():
            raise ValueError(f"{name} features contain NaN or inf")
    return features, labels


class _StepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr · 0.1^(number of boundaries ≤ step): MoCo's 'multiply by 0.1 at epochs 60 and 80'."""

    def __init__(self, base, boundaries):
        self.base, self.boundaries = float(base), [int(b) for b in boundaries]

    def __call__(self, step):
        step = ops.cast(step, "float32")
        drops = sum(ops.cast(step >= float(b), "float32") for b in self.boundaries) if self.boundaries else 0.0
        return self.base * ops.power(0.1, drops)

    def get_config(self):
        return {"base": self.base, "boundaries": self.boundaries}


# -------------------------------------------------------------------------------------------------------- head

class _Head:
    """Dense(num_classes) on (optionally standardised) features, its optimizer and compiled steps."""

    def __init__(self, dim, num_classes, s, steps_per_epoch, mean, std):
        self.dense = keras.layers.Dense(num_classes, kernel_initializer="zeros", bias_initializer="zeros",
                                        name="linear_head")
        self.dense.build((None, dim))
        self.mean, self.inv_std = tf.constant(mean, tf.float32), tf.constant(1.0 / std, tf.float32)
        total = s["epochs"] * steps_per_epoch
        if s["schedule"] == "cosine":
            lr = WarmupCosine(s["learning_rate"], total)
        elif s["schedule"] == "steps":
            lr = _StepSchedule(s["learning_rate"], [round(m * s["epochs"]) * steps_per_epoch for m in s["milestones"]])
        else:
            lr = s["learning_rate"]
        opt = LARS if s["optimizer"] == "lars" else SGD
        kw = {} if s["optimizer"] == "lars" else {"nesterov": bool(s["nesterov"])}
        self.optimizer = opt(lr, momentum=s["momentum"], weight_decay=s["weight_decay"], **kw)
        self.optimizer.build(self.dense.trainable_variables)
        self.spec = tf.TensorSpec([None, dim], tf.float32)
        self.logits = tf.function(self._logits, input_signature=[self.spec])

    def _logits(self, features):
        return self.dense((features - self.mean) * self.inv_std)

    def step_fn(self, features_of=None, input_spec=None):
        """A compiled training step on a batch; ``features_of`` maps the batch to features (default: identity)."""
        variables = self.dense.trainable_variables

        def step(x, y):
            f = features_of(x) if features_of is not None else x
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, self._logits(f)))
            self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss
        return tf.function(step, input_signature=[input_spec or self.spec, tf.TensorSpec([None], tf.int64)])

    def get(self):
        return [v.numpy() for v in self.dense.weights]

    def set(self, values):
        for v, x in zip(self.dense.weights, values):
            v.assign(x)

    def accuracy(self, features, labels, rows=None, chunk=8192):
        """(top1, top5) fractions over ``rows`` (default all); ties rank the lower class first."""
        rows = np.arange(len(labels)) if rows is None else rows
        if len(rows) == 0:
            return None, None
        ranks = []
        for start in range(0, len(rows), chunk):
            logits = self.logits(tf.constant(features[rows[start:start + chunk]])).numpy()
            ranks.append(np.argsort(-logits, axis=1, kind="stable")[:, :5])
        hit = np.concatenate(ranks) == np.asarray(labels)[rows][:, None]
        return float(hit[:, 0].mean()), float(hit.any(axis=1).mean())


def _fit(head, step, epoch_batches, s, val, log):
    """Train for s['epochs'] epochs; returns (val history, loss history, best epoch (1-based), best weights)."""
    val_hist, loss_hist, best_epoch, best_weights = [], [], None, None
    for epoch in range(1, s["epochs"] + 1):
        total, count = 0.0, 0
        for x, y in epoch_batches(epoch):
            total += float(step(x, y)) * len(y)
            count += len(y)
        loss = total / max(1, count)
        if not math.isfinite(loss):
            raise RuntimeError(f"linear probe diverged at epoch {epoch} (train loss {loss}); lower lr "
                               f"(now {s['learning_rate']:g}) or set standardize=True")
        loss_hist.append(loss)
        msg = f"linear probe epoch {epoch}/{s['epochs']}: train loss {loss:.4f}"
        if val is not None:
            top1, _ = head.accuracy(*val)
            val_hist.append(top1)
            if best_epoch is None or top1 > val_hist[best_epoch - 1]:
                best_epoch, best_weights = epoch, head.get()
            msg += f", val top-1 {top1:.4f}"
        if log:
            log(msg)
    return val_hist, loss_hist, best_epoch, best_weights


def _report(head, s, train, test, val_hist, loss_hist, best_epoch, best_weights, counts):
    """The result dict: last-epoch test/train accuracy, then the best-validation head scored on test once."""
    top1, top5 = head.accuracy(*test) if test is not None else (None, None)
    train_top1, _ = head.accuracy(*train)
    at_best = (None, None)
    if best_weights is not None and test is not None:
        head.set(best_weights)
        at_best = head.accuracy(*test)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
    return {
        "top1": top1, "top5": top5,                                    # test, head of the LAST epoch
        "train_top1": train_top1,                                      # training split (not validation)
        "val_top1": val_hist,                                          # per epoch; index e-1 is epoch e
        "best_val_epoch": best_epoch,                                  # 1-based; first epoch reaching the max
        "best_val_top1": val_hist[best_epoch - 1] if best_epoch else None,
        "test_top1_at_best_val": at_best[0], "test_top5_at_best_val": at_best[1],
        "train_loss": loss_hist,
        **counts,
        "settings": settings,
    }


def _standardizer(features, rows, standardize, chunk=65536):
    """Per-dimension mean and std of ``features[rows]`` (float64 sums, chunked); identity when not standardising.

    A constant dimension keeps std 1 so it maps to 0 instead of NaN."""
    d = features.shape[1]
    if not standardize:
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    total, sq = np.zeros(d), np.zeros(d)
    for start in range(0, len(rows), chunk):
        block = features[rows[start:start + chunk]].astype(np.float64)
        total += block.sum(axis=0)
    mean = total / len(rows)
    for start in range(0, len(rows), chunk):
        sq += np.square(features[rows[start:start + chunk]].astype(np.float64) - mean).sum(axis=0)
    std = np.sqrt(sq / len(rows))
    return mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- public protocols

def linear_probe(train_features, train_labels, test_features, test_labels, num_classes, preset="small", *,
                 epochs=None, batch_size=None, optimizer=None, lr=None, lr_scaling=None, momentum=None,
                 nesterov=None, weight_decay=None, schedule=None, milestones=None, standardize=None,
                 val_fraction=0.1, seed=0, log=None):
    """Linear probe on precomputed frozen features (the fast path of the METHODS.md linear protocol).

    ``preset`` (``moco``, ``simclr``, ``small``; see :data:`PRESETS` and the module docstring for their sources)
    fills every hyper-parameter left as None. ``lr`` is the base rate before ``lr_scaling`` (``linear``:
    lr·B/256); ``milestones`` are fractions of ``epochs`` where the ``steps`` schedule multiplies lr by 0.1;
    ``standardize`` uses the training split's per-dimension mean/std. ``val_fraction`` of train (stratified,
    :func:`split_validation` with ``seed``) is held out for validation and NOT trained on; 0 trains on all of it
    and reports no best-validation figures. ``test_features`` may be None (validation only). ``log`` gets one line
    per epoch. Deterministic given ``seed``: zero-initialised head, seeded split and per-epoch shuffles.

    Returns a dict: ``top1``/``top5`` (test, last epoch), ``train_top1``, ``val_top1`` (per-epoch history),
    ``best_val_epoch`` (1-based), ``best_val_top1``, ``test_top1_at_best_val``/``test_top5_at_best_val`` (the
    head chosen by validation, evaluated on test once), ``train_loss`` history, split sizes and ``settings``.
    """
    s = _settings(preset, dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                               lr_scaling=lr_scaling, momentum=momentum, nesterov=nesterov,
                               weight_decay=weight_decay, schedule=schedule, milestones=milestones,
                               standardize=standardize))
    x, y = _check(train_features, train_labels, num_classes, "train")
    test = None
    if test_features is not None or test_labels is not None:
        test = _check(test_features, test_labels, num_classes, "test")
        if test[0].shape[1] != x.shape[1]:
            raise ValueError(f"train features have {x.shape[1]} dimensions but test features {test[0].shape[1]}")
    s.update(val_fraction=float(val_fraction), seed=int(seed))
    tr, va = split_validation(y, val_fraction, seed)
    val = (x, y, va) if len(va) else None                          # rows are indexed per batch: no copies
    mean, std = _standardizer(x, tr, s["standardize"])
    steps = -(-len(tr) // s["batch_size"])
    head = _Head(x.shape[1], num_classes, s, steps, mean, std)
    step = head.step_fn()
    rng = np.random.default_rng([int(seed), 1])
    b = s["batch_size"]

    def batches(_):
        order = tr[rng.permutation(len(tr))]
        for start in range(0, len(order), b):
            idx = order[start:start + b]
            yield tf.constant(x[idx]), tf.constant(y[idx])

    hist = _fit(head, step, batches, s, val, log)
    counts = {"num_train": int(len(tr)), "num_val": int(len(va)), "num_test": int(len(test[1])) if test else 0,
              "feature_dim": int(x.shape[1]), "num_classes": int(num_classes)}
    return _report(head, s, (x, y, tr), test, *hist, counts)


def augmented_linear_probe(backbone, train_ds, test_ds, num_classes, views=None, epochs=None, preset="small", *,
                           augment_preset="fashion_mnist", size=None, shuffle_buffer=10000, batch_size=None,
                           optimizer=None, lr=None, lr_scaling=None, momentum=None, nesterov=None, weight_decay=None,
                           schedule=None, milestones=None, standardize=None, val_fraction=0.1, seed=0, log=None):
    """Linear probe with augmentation, the papers' path: fresh crop + flip views of every training image each epoch.

    ``train_ds``/``test_ds``: datasets of (images in [0,1], labels) batches, in a fixed order, as
    ``tfssl.data.eval_pipeline`` makes (``test_ds`` may be None). ``views``: a callable on image batches, by default
    ``tfssl.views.view("weak", augment_preset, size)`` — random-resized-crop (the preset's ``crop_scale``: 0.08–1
    for the papers) + horizontal flip, with ``size`` the training images' side. The backbone runs with ``training=False`` throughout: frozen weights,
    BatchNorm in inference mode with its moving statistics unchanged.

    Validation and test images are not augmented: they are already the evaluation view of the source (for
    fixed-size sources the whole image; for image folders the centre crop of the short-side resize,
    :mod:`tfssl.data`), so their features are computed once, as are the clean training features that give the
    standardisation statistics and ``train_top1``. Head, schedule, validation split and the result dict
    are those of :func:`linear_probe`. The augmentation draws from TensorFlow's global RNG: call
    ``keras.utils.set_random_seed`` first for a reproducible run; the split and the shuffle follow ``seed``.
    """
    from tfssl.views import view as make_view
    s = _settings(preset, dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                               lr_scaling=lr_scaling, momentum=momentum, nesterov=nesterov,
                               weight_decay=weight_decay, schedule=schedule, milestones=milestones,
                               standardize=standardize))
    images_spec = train_ds.element_spec[0]
    if views is None:
        side = size or images_spec.shape[1]
        if side is None:
            raise ValueError("augmented_linear_probe: the training images have no static size; pass size=")
        views = make_view("weak", augment_preset, int(side), scale=s["crop_scale"])
    clean, labels = embed(backbone, train_ds)
    clean, labels = _check(clean, labels, num_classes, "train")
    test = None
    if test_ds is not None:
        test = _check(*embed(backbone, test_ds), num_classes, "test")
    s.update(val_fraction=float(val_fraction), seed=int(seed), augmented=True)
    tr, va = split_validation(labels, val_fraction, seed)
    val = (clean, labels, va) if len(va) else None
    mean, std = _standardizer(clean, tr, s["standardize"])
    steps = -(-len(tr) // s["batch_size"])
    head = _Head(clean.shape[1], num_classes, s, steps, mean, std)

    keep = np.zeros(len(labels), bool)
    keep[tr] = True
    keep, known = tf.constant(keep), tf.constant(labels)

    def checked(i, e):
        """The split was made on the embedding pass: every pass must give the same images in the same order."""
        y = tf.cast(e[1], tf.int64)
        tf.debugging.assert_equal(y, tf.gather(known, i), message="augmented_linear_probe: train_ds yielded a "
                                  "different order than on the first pass; give it a fixed order (no shuffle)")
        return e[0], y
    images = (train_ds.unbatch().enumerate()
              .filter(lambda i, e: tf.gather(keep, i))
              .map(checked)
              .shuffle(min(shuffle_buffer, len(tr)), seed=seed, reshuffle_each_iteration=True)
              .batch(s["batch_size"]).prefetch(tf.data.AUTOTUNE))
    spec = tf.TensorSpec([None, *images_spec.shape[1:]], tf.float32)
    step = head.step_fn(lambda x: backbone(views(x), training=False), input_spec=spec)
    hist = _fit(head, step, lambda _: ((tf.cast(x, tf.float32), y) for x, y in images), s, val, log)
    counts = {"num_train": int(len(tr)), "num_val": int(len(va)), "num_test": int(len(test[1])) if test else 0,
              "feature_dim": int(clean.shape[1]), "num_classes": int(num_classes)}
    return _report(head, s, (clean, labels, tr), test, *hist, counts)
