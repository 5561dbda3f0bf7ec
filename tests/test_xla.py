"""Every method's whole train step (views in, EMA, teacher, loss, optimizer, queue, probe, metrics) compiles with
XLA (``jit_compile=True``) on the CPU — the TPU requirement: no host round-trips, static shapes — and computes the
same step as the uncompiled function."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from test_methods import CASES, _build, _views


@pytest.mark.parametrize("name,params", CASES, ids=lambda x: str(x))
def test_train_step_compiles_with_xla_and_matches_eager(name, params):
    keras.utils.set_random_seed(0)
    cfg = tiny_config(name, **params)
    views, labels = _views(cfg)
    batch = {"views": tuple(tf.constant(v) for v in views), "label": tf.constant(labels)}
    plain = _build(cfg, tf.distribute.get_strategy())
    xla = _build(cfg, tf.distribute.get_strategy(), plain.get_weights())
    step = tf.function(xla.train_step, jit_compile=True)     # raises if any op of the step cannot be compiled
    logs_xla = step(batch)
    logs_plain = tf.function(plain.train_step)(batch)
    assert np.isfinite(float(logs_xla["loss"]))
    np.testing.assert_allclose(float(logs_xla["loss"]), float(logs_plain["loss"]), rtol=1e-4, atol=1e-5)
    for a, b, v in zip(plain.get_weights(), xla.get_weights(), plain.weights):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3, err_msg=v.path)
