"""Collapse monitors equal independent float64 numpy references, hit their known values, and reach Keras logs."""
import glob
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl.eval import monitors
from tfssl.eval.monitors import (CollapseMonitor, alignment, collapse_report, dimension_std, effective_rank,
                                 uniformity)


# ----------------------------------------------------------------------------- references (naive, float64)
def unit(z):
    z = np.asarray(z, np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def ref_std(z):
    return np.std(unit(z), axis=0).mean()


def ref_effective_rank(z, center=True):
    z = np.asarray(z, np.float64)
    s = np.linalg.svd(z - z.mean(0) if center else z, compute_uv=False)
    p = s / s.sum()
    p = p[p > 1e-15]
    return np.exp(-np.sum(p * np.log(p)))


def ref_alignment(a, b, alpha):
    return np.mean(np.linalg.norm(unit(a) - unit(b), axis=1) ** alpha)


def ref_uniformity(z, t):
    u = unit(z)
    d2 = np.sum((u[:, None, :] - u[None, :, :]) ** 2, axis=-1)
    i, j = np.triu_indices(len(u), k=1)
    return np.log(np.mean(np.exp(-t * d2[i, j])))


def random_embeddings(n, d, seed, float32=True):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d)) * rng.uniform(0.2, 3.0, d) + rng.standard_normal(d)   # anisotropic, offset
    return z.astype(np.float32) if float32 else z


# ----------------------------------------------------------------------------- against the references
@pytest.mark.parametrize("n,d", [(300, 16), (40, 64), (1, 8)])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_dimension_std_matches_numpy(n, d, chunk):
    z = random_embeddings(n, d, n + d)
    std, reference = dimension_std(z, chunk=chunk)
    assert std == pytest.approx(ref_std(z), rel=1e-9, abs=1e-15)
    assert reference == pytest.approx(1 / math.sqrt(d))
    assert isinstance(std, float) and isinstance(reference, float)


@pytest.mark.parametrize("n,d", [(300, 16), (40, 64), (64, 64)])
@pytest.mark.parametrize("chunk", [7, 4096])
@pytest.mark.parametrize("center", [True, False])
def test_effective_rank_matches_numpy(n, d, chunk, center):
    z = random_embeddings(n, d, n * d)
    ours = effective_rank(z, center=center, chunk=chunk)
    assert isinstance(ours, float)
    assert ours == pytest.approx(ref_effective_rank(z, center), rel=1e-9)


def test_singular_values_match_svd_both_gram_orientations():
    for n, d in [(200, 24), (24, 200)]:        # D×D Gram over chunks, and the N×N Gram when N < D
        z = random_embeddings(n, d, 3)
        zc = z.astype(np.float64) - z.astype(np.float64).mean(0)
        ref = np.linalg.svd(zc, compute_uv=False)
        ours = monitors.singular_values(z, chunk=17)
        np.testing.assert_allclose(ours[:len(ref)], ref, rtol=1e-8, atol=1e-8 * ref[0])
        assert np.all(ours[len(ref):] == 0)


def test_effective_rank_of_a_known_spectrum():
    """Centred Z = U diag(s) Vᵀ with orthonormal, zero-mean U: erank = exp(H(s / Σs)) exactly."""
    rng = np.random.default_rng(0)
    n, d, s = 500, 32, np.array([5.0, 4.0, 2.0, 1.0, 0.5])
    a = rng.standard_normal((n, len(s)))
    u, _ = np.linalg.qr(a - a.mean(0))
    v, _ = np.linalg.qr(rng.standard_normal((d, len(s))))
    z = (u * s) @ v.T + 3.0                              # a constant offset is removed by centring
    p = s / s.sum()
    assert effective_rank(z) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-9)
    assert effective_rank(z) < len(s)


@pytest.mark.parametrize("alpha", [1, 2, 3])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_alignment_matches_numpy(alpha, chunk):
    a = random_embeddings(200, 24, 1)
    b = a + 0.5 * random_embeddings(200, 24, 2)
    ours = alignment(a, b, alpha=alpha, chunk=chunk)
    assert ours == pytest.approx(ref_alignment(a, b, alpha), rel=1e-9)


@pytest.mark.parametrize("t", [0.5, 2, 10])
@pytest.mark.parametrize("chunk", [1, 13, 1024])
def test_uniformity_exact_matches_numpy(t, chunk):
    z = random_embeddings(150, 12, 4)
    ref = ref_uniformity(z, t)
    assert uniformity(z, t=t, chunk=chunk) == pytest.approx(ref, rel=1e-9)
    assert uniformity(z, t=t, max_samples=None, chunk=chunk) == pytest.approx(ref, rel=1e-9)
    assert uniformity(z, t=t, max_samples=150, chunk=chunk) == pytest.approx(ref, rel=1e-9)


def test_uniformity_subsampled_is_close_and_seeded():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((1500, 8)) + np.repeat(rng.standard_normal((5, 8)) * 1.5, 300, axis=0)
    exact = ref_uniformity(z, 2)
    sub = uniformity(z, t=2, max_samples=400, seed=1)
    assert sub == pytest.approx(exact, abs=0.05)
    assert sub == uniformity(z, t=2, max_samples=400, seed=1)                 # deterministic for a seed
    assert sub != uniformity(z, t=2, max_samples=400, seed=2)
    i = np.sort(np.random.default_rng(1).choice(1500, 400, replace=False))    # documented: these rows, exactly
    assert sub == pytest.approx(ref_uniformity(z[i], 2), rel=1e-9)


def test_uniformity_large_input_stays_bounded():
    """A 20 000 × 256 input goes through the default 4096-row cap in chunks (no 20 000² matrix)."""
    z = np.random.default_rng(0).standard_normal((20000, 256)).astype(np.float32)
    u = uniformity(z)
    assert -4.0 < u < -3.5      # ≈ −2t = −4 + O(1/D) for near-uniform points on a high-dimensional sphere


# ----------------------------------------------------------------------------- known cases
def test_identical_embeddings_are_collapsed():
    row = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    z = np.repeat(row, 257, axis=0)
    std, reference = dimension_std(z)
    assert std == pytest.approx(0.0, abs=1e-12) and reference == pytest.approx(1 / 8)
    assert effective_rank(z) == 1.0
    assert effective_rank(np.zeros((10, 4))) == 1.0
    assert uniformity(z) == pytest.approx(0.0, abs=1e-12)
    assert alignment(z, z) == 0.0
    assert alignment(z, 3.0 * z) == pytest.approx(0.0, abs=1e-12)      # same direction after normalisation


def test_isotropic_gaussian_is_spread():
    d = 32
    z = np.random.default_rng(1).standard_normal((20000, d)).astype(np.float32)
    std, reference = dimension_std(z)
    assert std == pytest.approx(reference, rel=0.02)
    assert effective_rank(z) == pytest.approx(d, rel=0.02)
    assert effective_rank(z) <= d


def test_rank_deficient_embeddings():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((400, 3)) @ rng.standard_normal((3, 128))     # a 3-dim subspace of 128 dims
    assert 1.5 < effective_rank(z) <= 3.0 + 1e-9
    assert effective_rank(z) == pytest.approx(ref_effective_rank(z), rel=1e-9)


def test_collapse_report_and_errors():
    z = random_embeddings(100, 16, 0)
    report = collapse_report(z, z + 0.01)
    assert set(report) == {"std", "std_reference", "effective_rank", "uniformity", "alignment"}
    assert all(isinstance(v, float) for v in report.values())
    assert "alignment" not in collapse_report(z)
    assert math.isnan(collapse_report(z[:1])["uniformity"])
    with pytest.raises(ValueError):
        dimension_std(np.zeros(5))
    with pytest.raises(ValueError):
        alignment(z, z[:10])
    with pytest.raises(ValueError):
        uniformity(z[:1])


# ----------------------------------------------------------------------------- the Keras callback
class Tiny(keras.Model):
    """A regression model with a ``.backbone`` (what tfssl methods expose)."""

    def __init__(self, zero=False):
        super().__init__()
        init = dict(kernel_initializer="zeros", bias_initializer="ones") if zero else {}
        self.backbone = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(12, **init)], name="backbone")
        self.head = keras.layers.Dense(1)

    def call(self, x):
        return self.head(self.backbone(x))


def images(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, 6, 6, 1)).astype(np.float32), rng.standard_normal((n, 1)).astype(np.float32)


def test_collapse_monitor_writes_logs_history_and_tensorboard(tmp_path):
    x, y = images()
    model = Tiny()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    monitor = CollapseMonitor(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), every=1, batches=2)
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[
        monitor, keras.callbacks.TensorBoard(str(tmp_path), write_graph=False)])
    keys = {"emb_std", "emb_std_reference", "emb_effective_rank", "emb_uniformity"}
    assert keys <= set(history.history) and all(len(history.history[k]) == 2 for k in keys)
    z = model.backbone(x[:64], training=False).numpy()                  # the fixed set: the first 2 batches
    expected = collapse_report(z)
    for k in keys:
        assert history.history[k][-1] == pytest.approx(expected[k[4:]], rel=1e-5)
    assert history.history["emb_std_reference"][-1] == pytest.approx(1 / math.sqrt(12))
    tags = set()
    for path in glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {v.tag for v in event.summary.value}
    assert {"epoch_emb_std", "epoch_emb_effective_rank", "epoch_emb_uniformity"} <= tags


def test_collapse_monitor_sees_a_collapsed_backbone_and_uint8_views():
    x, y = images(40)
    model = Tiny(zero=True)                                              # every input ↦ the same embedding
    model.compile(keras.optimizers.SGD(0.0), "mse")
    ds = tf.data.Dataset.from_tensor_slices({"views": ((x * 255).astype(np.uint8), (x * 255).astype(np.uint8))})
    monitor = CollapseMonitor(ds.batch(8), every=1)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.last["std"] == pytest.approx(0.0, abs=1e-9)
    assert monitor.last["effective_rank"] == 1.0
    assert monitor.last["uniformity"] == pytest.approx(0.0, abs=1e-9)
    assert monitor.last["alignment"] == pytest.approx(0.0, abs=1e-12)


def test_collapse_monitor_schedule_fixed_set_and_views_callable():
    x, y = images(48)
    model = Tiny()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    calls = []

    class Counting(CollapseMonitor):
        def evaluate(self):
            calls.append(len(calls))
            return super().evaluate()

    noise = tf.constant(np.random.default_rng(3).normal(0, 0.05, (16, 6, 6, 1)), tf.float32)
    monitor = Counting(tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(16), every=2, batches=2,
                       views=lambda im: (im, im + noise))
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[monitor])
    assert len(calls) == 2                                  # epoch 2 (every=2) and epoch 3 (the last)
    assert len(history.history["emb_alignment"]) == 2
    z1 = model.backbone(x[:32], training=False).numpy()
    z2 = model.backbone(x[:32] + np.concatenate([noise.numpy()] * 2), training=False).numpy()
    assert monitor.last["alignment"] == pytest.approx(alignment(z1, z2), rel=1e-5)
    assert monitor.last["alignment"] > 0
    assert len(monitor._fixed) == 2                         # read once from a repeated dataset, then reused
