"""Collapse and quality monitors of embeddings: per-dimension std, effective rank, alignment and uniformity.

Pure functions (numpy arrays in, Python floats out, float64 inside) and :class:`CollapseMonitor`, a Keras callback
that adds them to the epoch logs during pretraining.

- **Per-dimension std** (SimSiam, Chen & He 2021, Sec. 4.1): the std over samples of each coordinate of the
  L2-normalised embeddings, averaged over the D coordinates. A collapsed representation (every input mapped to one
  point) gives 0; embeddings uniform on the unit sphere give ≈ 1/√D (each coordinate has mean 0, variance 1/D).
- **Effective rank** (Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality"): with
  σ_1 … σ_K the singular values of the centred N×D embedding matrix and p_k = σ_k / Σ_j σ_j,
  erank = exp(−Σ_k p_k log p_k), between 1 (all variance along one direction) and min(N, D) (a flat spectrum).
  RankMe (Garrido et al. 2023) uses the same quantity without centring (``center=False``).
- **Alignment and uniformity** (Wang & Isola 2020, "Understanding contrastive representation learning through
  alignment and uniformity on the hypersphere"), on L2-normalised f:
  align_α = E_(x,y)~positive pairs ‖f(x) − f(y)‖^α (0 is perfect; α = 2 in the paper) and
  uniform_t = log E_(x,y)~all distinct pairs exp(−t‖f(x) − f(y)‖²) (t = 2 in the paper; 0 for a collapsed
  representation, lower is more uniform; ≈ −2t for points uniform on a high-dimensional sphere, whose pairwise
  distances concentrate at √2).

Memory: rows are processed in chunks of ``chunk`` so 100 k × 2048 embeddings need at most a D×D float64 matrix
besides the input (when N < D: an N×N one and a float64 copy of the input); uniformity's all-pairs sum is O(M²·D) in time, so it is computed exactly on
at most ``max_samples`` rows (default 4096, ≈ 8.4 M pairs) drawn without replacement with a fixed seed.
"""
from __future__ import annotations

import itertools
import math

import keras
import numpy as np
import tensorflow as tf

CHUNK = 4096            # rows per chunk of the streaming passes
UNIFORMITY_SAMPLES = 4096  # default row cap of uniformity (exact over all pairs of the kept rows)
NORM_EPS = 1e-12        # as tf.math.l2_normalize: x / sqrt(max(‖x‖², eps)); zero rows stay zero
COLLAPSE_SPREAD = 1e-6  # centred ‖Z − mean‖_F ≤ this · ‖Z‖_F counts as no spread at all (float32 rounding level)


def _matrix(z, name="z"):
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] matrix of embeddings, got shape {z.shape}")
    return z


def _unit(rows):
    """float64 L2-normalised copy of a block of rows."""
    rows = np.asarray(rows, np.float64)
    return rows / np.sqrt(np.maximum(np.sum(rows * rows, axis=1, keepdims=True), NORM_EPS))


def _chunks(n, chunk):
    return ((s, min(s + chunk, n)) for s in range(0, n, max(1, int(chunk))))


def dimension_std(z, chunk=CHUNK):
    """(mean over dimensions of the std over samples of the L2-normalised embeddings, the reference 1/√D).

    Population std (ddof = 0), as ``tf.math.reduce_std``; two passes (mean, then squared deviations) in float64.
    """
    z = _matrix(z)
    n, d = z.shape
    mean = sum(_unit(z[a:b]).sum(axis=0) for a, b in _chunks(n, chunk)) / n
    var = sum(np.square(_unit(z[a:b]) - mean).sum(axis=0) for a, b in _chunks(n, chunk)) / n
    return float(np.mean(np.sqrt(var))), 1.0 / math.sqrt(d)


def singular_values(z, center=True, chunk=CHUNK):
    """Singular values (descending, float64) of the N×D matrix z (column means removed when ``center``).

    Computed as square roots of the eigenvalues of the smaller Gram matrix (D×D accumulated over row chunks, or
    N×N when N < D); eigenvalues below ``λ_max · size · eps`` are numerical zeros and set to 0.
    """
    z = _matrix(z)
    n, d = z.shape
    mean = (sum(np.asarray(z[a:b], np.float64).sum(axis=0) for a, b in _chunks(n, chunk)) / n if center
            else np.zeros(d))
    if n < d:
        zc = np.asarray(z, np.float64) - mean
        gram = zc @ zc.T
    else:
        gram = np.zeros((d, d))
        for a, b in _chunks(n, chunk):
            block = np.asarray(z[a:b], np.float64) - mean
            gram += block.T @ block
    eig = np.clip(tf.linalg.eigvalsh(tf.constant(gram)).numpy()[::-1], 0.0, None)   # TF's eigh: ~2× numpy's here
    if eig[0] > 0:
        eig[eig <= eig[0] * len(eig) * np.finfo(np.float64).eps] = 0.0
    return np.sqrt(eig)


def effective_rank(z, center=True, chunk=CHUNK):
    """Roy & Vetterli's effective rank exp(H(p)), p_k = σ_k / Σσ, of the (centred) embedding matrix.

    Embeddings without spread (all rows equal up to float32 rounding: centred Frobenius norm ≤ 1e-6 of the
    uncentred one, or an all-zero matrix) return 1.0, the measure's minimum, instead of 0/0.
    """
    z = _matrix(z)
    sigma = singular_values(z, center, chunk)
    scale = math.sqrt(sum(float(np.sum(np.square(np.asarray(z[a:b], np.float64))))
                          for a, b in _chunks(len(z), chunk)))
    spread = float(np.sqrt(np.sum(np.square(sigma))))
    if spread == 0.0 or spread <= COLLAPSE_SPREAD * scale:
        return 1.0
    p = sigma[sigma > 0] / np.sum(sigma)
    return float(np.exp(-np.sum(p * np.log(p))))


def alignment(z1, z2, alpha=2, chunk=CHUNK):
    """Wang & Isola's alignment E‖f(x) − f(y)‖^α over the positive pairs (z1[i], z2[i]), on L2-normalised rows."""
    z1, z2 = _matrix(z1, "z1"), _matrix(z2, "z2")
    if z1.shape != z2.shape:
        raise ValueError(f"alignment needs paired embeddings of one shape, got {z1.shape} and {z2.shape}")
    total = sum(float(np.sum(np.linalg.norm(_unit(z1[a:b]) - _unit(z2[a:b]), axis=1) ** alpha))
                for a, b in _chunks(len(z1), chunk))
    return total / len(z1)


def _logsumexp(x):
    top = np.max(x)
    return float(top + np.log(np.sum(np.exp(x - top))))


def uniformity(z, t=2, max_samples=UNIFORMITY_SAMPLES, seed=0, chunk=1024):
    """Wang & Isola's uniformity log E exp(−t‖f(x) − f(y)‖²) over all distinct pairs i < j, L2-normalised rows.

    Exact over all N(N−1)/2 pairs when N ≤ ``max_samples`` (or ``max_samples`` is None), else exact over the pairs of
    ``max_samples`` rows drawn without replacement (seeded). Summed as a running log-sum-exp over ``chunk × M``
    blocks of the similarity matrix (‖a − b‖² = 2 − 2 a·b for unit rows), so memory stays ``chunk · M`` floats.
    """
    z = _matrix(z)
    n = len(z)
    if n < 2:
        raise ValueError("uniformity needs at least 2 embeddings (it averages over distinct pairs)")
    if max_samples and n > max_samples:
        z = z[np.sort(np.random.default_rng(seed).choice(n, int(max_samples), replace=False))]
    u = _unit(z)
    m = len(u)
    total = -np.inf
    for a, b in _chunks(m - 1, chunk):               # the last row has no partner j > i
        d2 = np.clip(2.0 - 2.0 * (u[a:b] @ u[a + 1:].T), 0.0, 4.0)     # rows i ∈ [a, b), columns j ∈ [a+1, m)
        upper = np.arange(a + 1, m)[None, :] > np.arange(a, b)[:, None]
        total = np.logaddexp(total, _logsumexp(-t * d2[upper]))
    return float(total - math.log(m * (m - 1) / 2))


def collapse_report(z, z2=None, alpha=2, t=2, max_samples=UNIFORMITY_SAMPLES):
    """{'std', 'std_reference', 'effective_rank', 'uniformity'[, 'alignment']} of embeddings z (and positives z2).

    ``alignment`` is present only when ``z2`` (the embeddings of a second view of the same inputs) is given;
    ``uniformity`` is NaN for a single embedding (no pairs).
    """
    std, reference = dimension_std(z)
    report = {"std": std, "std_reference": reference, "effective_rank": effective_rank(z)}
    report["uniformity"] = uniformity(z, t, max_samples) if len(z) > 1 else float("nan")
    if z2 is not None:
        report["alignment"] = alignment(z, z2, alpha)
    return report


def _as_images(x):
    """Float32 images in [0, 1] (uint8 batches are scaled by 1/255, as :func:`tfssl.data.eval_pipeline` does)."""
    x = tf.convert_to_tensor(x)
    return tf.cast(x, tf.float32) / 255.0 if x.dtype == tf.uint8 else tf.cast(x, tf.float32)


def _split_batch(batch):
    """(images, (view 1, view 2) or None) of an eval ``(images, labels)`` / ``{"image"}`` / ``{"views"}`` batch."""
    views = None
    if isinstance(batch, dict):
        views = batch.get("views")
        images = batch["image"] if views is None else views[0]
    elif isinstance(batch, (tuple, list)):
        images = batch[0]
        if isinstance(images, (tuple, list)):
            views, images = images, images[0]
    else:
        images = batch
    return images, (tuple(views[:2]) if views is not None and len(views) > 1 else None)


class CollapseMonitor(keras.callbacks.Callback):
    """Collapse monitors of the backbone's features on a small fixed set of batches, added to the epoch logs.

    ``dataset`` yields eval batches (``(images, labels)`` as :func:`tfssl.data.eval_pipeline`, ``{"image", …}``, or
    bare images) or training batches with views (``{"views": (v1, v2, …), …}``); images are uint8 or float in
    [0, 1]. Its first ``batches`` batches are read once (at the first evaluation) and reused every time, so the
    numbers of different epochs describe the same inputs. With a second view (from the batches, or from ``views``,
    a callable images → tuple of views such as :class:`tfssl.views.Views`, applied once to the fixed images) the
    logs also get the alignment of the two views' features.

    Every ``every`` epochs (0: only after the last epoch, read from ``self.params['epochs']``) and after the last
    epoch, ``model.backbone(x, training=False)`` embeds the set and ``logs`` gains ``emb_std``,
    ``emb_std_reference`` (1/√D), ``emb_effective_rank``, ``emb_uniformity`` [and ``emb_alignment``] (prefix
    ``prefix``). Put this callback before ``keras.callbacks.TensorBoard`` so TensorBoard sees the keys; History
    always does.
    """

    def __init__(self, dataset, every=1, batches=16, views=None, prefix="emb_", max_samples=UNIFORMITY_SAMPLES):
        super().__init__()
        self.dataset, self.every, self.batches, self.views = dataset, every, batches, views
        self.prefix, self.max_samples = prefix, max_samples
        self.last = {}
        self._fixed = None
        self._forward = None

    def set_model(self, model):
        super().set_model(model)
        self._forward = None

    def _fixed_batches(self):
        if self._fixed is None:
            source = itertools.islice(iter(self.dataset), self.batches) if self.batches else iter(self.dataset)
            fixed = []
            for batch in source:
                images, pair = _split_batch(batch)
                images = _as_images(images)
                if pair is None and self.views is not None:
                    pair = tuple(self.views(images))[:2]
                fixed.append((images, None if pair is None else tuple(_as_images(v) for v in pair)))
            if not fixed:
                raise ValueError("CollapseMonitor: the dataset yielded no batches")
            self._fixed = fixed
        return self._fixed

    def embed(self):
        """(features, view-1 features, view-2 features) [N, D] of the fixed set (views None without pairs)."""
        if self._forward is None:
            backbone = self.model.backbone
            self._forward = tf.function(lambda x: backbone(x, training=False), reduce_retracing=True)
        fixed = self._fixed_batches()
        z = np.concatenate([self._forward(x).numpy() for x, _ in fixed])
        if not all(pair is not None for _, pair in fixed):
            return z, None, None
        z1 = np.concatenate([self._forward(pair[0]).numpy() for _, pair in fixed])
        z2 = np.concatenate([self._forward(pair[1]).numpy() for _, pair in fixed])
        return z, z1, z2

    def evaluate(self):
        z, z1, z2 = self.embed()
        self.last = collapse_report(z, max_samples=self.max_samples)
        if z1 is not None:
            self.last["alignment"] = alignment(z1, z2)
        return self.last

    def on_epoch_end(self, epoch, logs=None):
        epochs = (self.params or {}).get("epochs")
        final = epochs is not None and epoch + 1 == epochs
        if final or (self.every and (epoch + 1) % self.every == 0):
            result = self.evaluate()
            if logs is not None:
                logs.update({self.prefix + k: v for k, v in result.items()})
