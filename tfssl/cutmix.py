"""CutMix of an anchor view with its mined neighbour (METHODS.md, "CsMl" step 3).

mixed = the anchor's q-view with one box pasted from the neighbour's q-view; λ ~ Beta(2,2); box side
√(1−λ)·(H, W) rounded to whole pixels, centre uniform over the image, box clipped to the image; one λ and one box
per call (per batch); λ′ = fraction of the anchor's pixels kept, which weights the mix term of the loss.

Everything is TensorFlow ops on a stateless seed (shape [2] int): the same seed gives the same box eagerly, in a
``tf.function`` and under XLA (``jit_compile=True``; the uniforms are built from raw uint32 draws, whose stream XLA
and the TF kernels share; λ and λ′ may still differ in the last float32 bit, which could move a box by one pixel
only if √(1−λ)·H fell within that bit of a rounding boundary). Output shapes are the input shapes (the paste is a
mask of ``tf.range`` comparisons).
"""
from __future__ import annotations

import tensorflow as tf

from tfssl.rng import uniform as _uniform


def sample_lambda(seed, shape=()):
    """λ ~ Beta(2, 2) (CsMl step 3) of the given (python) shape, float32, from a stateless ``seed`` [2].

    Beta(2,2) = G1 / (G1 + G2) with G1, G2 ~ Gamma(2, 1); each Gamma(2) is drawn exactly as the sum of two Exp(1)
    = −log(1 − U) (the shape is an integer), because ``tf.random.stateless_gamma`` has no XLA kernel.
    """
    return _beta_2_2(_uniform(seed, [*shape, 4]))


def _beta_2_2(u):
    """Beta(2,2) from uniforms [..., 4]: (E0+E1) / (E0+E1+E2+E3) with Eₖ = −log(1 − Uₖ) ~ Exp(1)."""
    e = -tf.math.log1p(-u)
    g1, g2 = e[..., 0] + e[..., 1], e[..., 2] + e[..., 3]
    return tf.math.divide_no_nan(g1, g1 + g2)


def sample_params(seed):
    """(λ, centre) of one CutMix from a stateless ``seed`` [2]: λ ~ Beta(2,2) from the first four uniforms of the
    seed's stream (as :func:`sample_lambda`), the box centre (cy, cx) ~ U[0,1)² from the next two."""
    u = _uniform(seed, [6])
    return _beta_2_2(u[:4]), u[4:]


def sample_box(height, width, lam, centre):
    """The CutMix box (CsMl step 3) as int32 (y0, y1, x0, x1), rows y0…y1−1 and columns x0…x1−1.

    Side √(1−λ)·(H, W) rounded to whole pixels (λ clipped to [0, 1]); ``centre`` = (cy, cx) fractions in [0, 1)
    select the centre pixel (⌊cy·H⌋, ⌊cx·W⌋); the box is clipped to the image, so 0 ≤ y0 ≤ y1 ≤ H, 0 ≤ x0 ≤ x1 ≤ W.
    """
    side = tf.sqrt(1.0 - tf.clip_by_value(tf.cast(lam, tf.float32), 0.0, 1.0))
    centre = tf.cast(centre, tf.float32)
    bounds = []
    for size, frac in ((height, centre[0]), (width, centre[1])):
        size = tf.cast(size, tf.int32)
        cut = tf.cast(tf.round(side * tf.cast(size, tf.float32)), tf.int32)
        mid = tf.clip_by_value(tf.cast(tf.floor(frac * tf.cast(size, tf.float32)), tf.int32), 0, size - 1)
        start = mid - cut // 2
        bounds += [tf.clip_by_value(start, 0, size), tf.clip_by_value(start + cut, 0, size)]
    return tuple(bounds)


def paste(anchor, neighbour, box):
    """Anchor [B,H,W,C] with the neighbour's pixels inside ``box`` = (y0, y1, x0, x1) (same box for every image)."""
    y0, y1, x0, x1 = box
    rows = tf.range(tf.shape(anchor)[1])[:, None]
    cols = tf.range(tf.shape(anchor)[2])[None, :]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    return tf.where(inside[None, :, :, None], tf.cast(neighbour, anchor.dtype), anchor)


def cutmix(anchor, neighbour, seed=None):
    """CsMl CutMix (METHODS.md CsMl step 3): paste one neighbour box into every anchor image of the batch.

    anchor, neighbour: [B,H,W,C] float images (the q-views of the anchors and of their neighbours). Draws one
    λ ~ Beta(2,2) and one box per call (:func:`sample_params`, :func:`sample_box`) and returns
    ``(mixed [B,H,W,C], lam_prime)`` with λ′ = 1 − box area / (H·W) (float32 scalar), the anchor's kept fraction.
    ``seed``: a stateless seed [2] int (reproducible); None draws one from the global stateful RNG. Under a
    distribution strategy the method calls this once per replica batch, so each replica draws its own box and λ′
    (its own loss weight) unless all replicas are given the same seed.
    """
    if seed is None:
        seed = tf.random.uniform([2], 0, 2 ** 31 - 1, dtype=tf.int32)
    lam, centre = sample_params(seed)
    height, width = tf.shape(anchor)[1], tf.shape(anchor)[2]
    y0, y1, x0, x1 = sample_box(height, width, lam, centre)
    area = tf.cast((y1 - y0) * (x1 - x0), tf.float32)
    lam_prime = 1.0 - area / tf.cast(height * width, tf.float32)
    return paste(anchor, neighbour, (y0, y1, x0, x1)), lam_prime
