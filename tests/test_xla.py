"""Every method's whole train step (views in, EMA, teacher, loss, optimizer, queue, probe, metrics) compiles with
XLA (``jit_compile=True``) on the CPU — the TPU requirement: no host round-trips, static shapes — and computes the
same step as the uncompiled function; and how ``train.jit_compile: auto`` chooses between XLA and TF's graph."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from tfssl import distribute
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


# ------------------------------------------------------------------------------------ train.jit_compile: auto
@pytest.mark.parametrize("avx512,expected", [(True, False), (False, True)])
def test_auto_jit_on_a_cpu_follows_avx512(monkeypatch, avx512, expected):
    monkeypatch.setattr(distribute, "cpu_has_avx512", lambda: avx512)
    jit, why = distribute.resolve_jit_compile("auto")
    assert jit is expected and why.startswith("auto: CPU")


@pytest.mark.parametrize("device", ["GPU", "TPU"])
def test_auto_jit_is_xla_on_accelerators(monkeypatch, device):
    monkeypatch.setattr(distribute, "cpu_has_avx512", lambda: True)
    real = tf.config.list_logical_devices
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: [f"/{device}:0"] if kind == device else real(kind))
    assert distribute.resolve_jit_compile("auto") == (True, f"auto: {device}")


@pytest.mark.parametrize("setting", [True, False])
def test_an_explicit_jit_setting_wins(monkeypatch, setting):
    for avx512 in (True, False):
        monkeypatch.setattr(distribute, "cpu_has_avx512", lambda: avx512)
        assert distribute.resolve_jit_compile(setting) == (setting, "train.jit_compile")


def test_cpu_has_avx512_reads_the_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert distribute.cpu_has_avx512() is ("avx512f" in flags)
