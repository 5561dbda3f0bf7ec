"""Stateless uniform draws that are bit-identical eagerly, in a ``tf.function`` and under XLA.

``tf.random.stateless_uniform`` turns its raw bits into floats differently in the TF kernel and in XLA (and an int64
seed ≥ 2³¹ is read differently too), so a view drawn in the tf.data pipeline and the same view drawn in an
XLA-compiled step would differ. Built from raw uint32 draws of seeds reduced modulo 2³¹, whose stream XLA and the TF
kernels share, the uniforms agree exactly; the draws of views and CutMix use :func:`uniform`.
"""
from __future__ import annotations

import tensorflow as tf


def uniform(seed, shape, minval=0.0, maxval=1.0):
    """float32 uniforms in [minval, maxval) of ``shape`` from a stateless ``seed`` [2] (any int dtype): the top 24
    bits of Philox uint32 draws, scaled. The same seed gives the same values on every device and compile mode."""
    seed = tf.cast(tf.bitwise.bitwise_and(tf.cast(seed, tf.int64), 0x7FFFFFFF), tf.int32)
    bits = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.uint32, alg="philox")
    unit = tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (2.0 ** -24)
    return unit if (minval, maxval) == (0.0, 1.0) else minval + (maxval - minval) * unit


def fold_in(seed, data):
    """A new stateless seed [2] int64 from ``seed`` and an integer ``data`` (identical under XLA)."""
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), data, alg="philox")
