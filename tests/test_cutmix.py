"""CsMl CutMix (METHODS.md "CsMl" step 3): box geometry, λ′ = kept anchor fraction, λ ~ Beta(2,2), seeds, XLA."""
import numpy as np
import pytest
import tensorflow as tf

from tfssl import cutmix as cm

ANCHOR, NEIGHBOUR = 0.25, 0.75          # distinct constants: a pixel equal to ANCHOR was kept from the anchor


def _pair(b, h, w, c=3):
    return tf.fill([b, h, w, c], ANCHOR), tf.fill([b, h, w, c], NEIGHBOUR)


def _box(h, w, lam, centre):
    return tuple(int(v) for v in cm.sample_box(h, w, tf.constant(lam, tf.float32), tf.constant(centre, tf.float32)))


@pytest.mark.parametrize("h,w", [(32, 32), (24, 40), (7, 5), (1, 9)])
def test_lam_prime_is_measured_anchor_fraction_over_many_seeds(h, w):
    anchor, neighbour = _pair(3, h, w)
    run = tf.function(cm.cutmix)
    seen = set()
    for s in range(60):
        mixed, lam_prime = run(anchor, neighbour, tf.constant([s, 17 * s + 1]))
        mixed = mixed.numpy()
        assert mixed.shape == (3, h, w, 3) and lam_prime.dtype == tf.float32 and lam_prime.shape == ()
        assert set(np.unique(mixed)) <= {ANCHOR, NEIGHBOUR}
        kept = mixed == ANCHOR
        np.testing.assert_allclose(float(lam_prime), kept.mean(), rtol=0, atol=1e-6)
        assert (kept == kept[:1, :, :, :1]).all()                  # one box for the whole batch and all channels
        rows, cols = np.nonzero(~kept[0, :, :, 0])
        if rows.size:                                              # the pasted region is one rectangle
            assert rows.size == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        seen.add(round(float(lam_prime), 6))
    assert len(seen) > 5                                           # boxes actually vary with the seed


def test_paste_uses_the_sampled_box_and_neighbour_pixels():
    """cutmix(seed) = paste of sample_box(H, W, *sample_params(seed)); pasted pixels come from the same position
    of the neighbour image (not a shifted or resized patch)."""
    rng = np.random.default_rng(0)
    anchor = tf.constant(rng.random((2, 20, 30, 3)), tf.float32)
    neighbour = tf.constant(rng.random((2, 20, 30, 3)), tf.float32)
    for s in range(10):
        seed = tf.constant([s, 3])
        mixed, lam_prime = cm.cutmix(anchor, neighbour, seed)
        y0, y1, x0, x1 = (int(v) for v in cm.sample_box(20, 30, *cm.sample_params(seed)))
        expected = anchor.numpy().copy()
        expected[:, y0:y1, x0:x1] = neighbour.numpy()[:, y0:y1, x0:x1]
        np.testing.assert_array_equal(mixed.numpy(), expected)
        assert float(lam_prime) == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 600, abs=1e-7)


@pytest.mark.parametrize("h,w", [(32, 32), (17, 40), (1, 1), (2, 3)])
@pytest.mark.parametrize("lam", [0.0, 1e-6, 0.01, 0.3, 0.5, 0.99, 1 - 1e-6, 1.0])
@pytest.mark.parametrize("centre", [(0.0, 0.0), (0.999999, 0.999999), (0.0, 0.999999), (0.5, 0.5), (0.31, 0.77)])
def test_box_inside_image_for_edge_centres_and_extreme_lambda(h, w, lam, centre):
    y0, y1, x0, x1 = _box(h, w, lam, centre)
    assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
    side_h, side_w = round(np.sqrt(1 - lam) * h), round(np.sqrt(1 - lam) * w)
    assert y1 - y0 <= side_h and x1 - x0 <= side_w                 # clipping only shrinks the box
    cy, cx = min(int(centre[0] * h), h - 1), min(int(centre[1] * w), w - 1)
    if side_h and side_w:
        assert y0 <= cy < y1 and x0 <= cx < x1                     # the box contains its centre pixel


def test_box_side_and_extremes():
    assert _box(32, 32, 1.0, (0.5, 0.5)) == (16, 16, 16, 16)      # λ = 1: empty box, nothing pasted
    assert _box(32, 48, 0.0, (0.5, 0.5)) == (0, 32, 0, 48)        # λ = 0, central: the whole image
    assert _box(32, 48, 0.0, (0.0, 0.0)) == (0, 16, 0, 24)        # λ = 0 at a corner: clipped to a quarter
    assert _box(32, 48, 0.75, (0.5, 0.5)) == (8, 24, 12, 36)      # side √0.25 = 1/2 of each dimension
    assert _box(20, 30, 0.75, (0.999, 0.0)) == (14, 20, 0, 8)     # clipped at the bottom and the left edge
    y0, y1, x0, x1 = _box(100, 60, 0.36, (0.5, 0.5))              # side 0.8·(100, 60) = (80, 48)
    assert (y1 - y0, x1 - x0) == (80, 48)


def test_lambda_is_beta_2_2():
    """20000 draws: mean 1/2, variance 1/20 (Beta(2,2)), Kolmogorov–Smirnov distance to F(x) = 3x² − 2x³ small."""
    lam = np.sort(cm.sample_lambda(tf.constant([7, 11]), (20000,)).numpy().astype(np.float64))
    assert lam.min() >= 0.0 and lam.max() <= 1.0
    assert abs(lam.mean() - 0.5) < 0.01                            # s.e. 0.0016
    assert abs(lam.var() - 0.05) < 0.003                           # s.e. 0.0004
    cdf = 3 * lam ** 2 - 2 * lam ** 3
    n = lam.size
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.95 / np.sqrt(n)                                  # 0.1% critical value
    assert abs(np.mean(lam < 0.5) - 0.5) < 0.02                    # symmetric


def test_cutmix_lambda_follows_the_seed_stream_and_is_beta_distributed():
    """sample_params (what cutmix uses) draws λ from the same stream as sample_lambda; over seeds it is Beta(2,2)."""
    seeds = tf.stack([tf.range(5000), tf.fill([5000], 5)], axis=1)
    lams, centres = tf.function(lambda s: tf.map_fn(cm.sample_params, s, fn_output_signature=(
        tf.float32, tf.TensorSpec([2], tf.float32))))(seeds)
    for s in range(20):
        np.testing.assert_allclose(float(lams[s]), float(cm.sample_lambda(seeds[s])), rtol=1e-6)
    lams, centres = lams.numpy().astype(np.float64), centres.numpy().astype(np.float64)
    assert abs(lams.mean() - 0.5) < 0.015 and abs(lams.var() - 0.05) < 0.005      # s.e. 0.003 / 0.0008
    assert centres.min() >= 0.0 and centres.max() < 1.0
    np.testing.assert_allclose(centres.mean(axis=0), 0.5, atol=0.015)            # uniform centre, s.e. 0.004
    np.testing.assert_allclose(centres.var(axis=0), 1 / 12, atol=0.006)
    assert abs(np.corrcoef(lams, centres[:, 0])[0, 1]) < 0.06                     # independent of λ


def test_same_seed_same_output_different_seed_differs():
    rng = np.random.default_rng(1)
    anchor = tf.constant(rng.random((4, 16, 24, 3)), tf.float32)
    neighbour = tf.constant(rng.random((4, 16, 24, 3)), tf.float32)
    a1, l1 = cm.cutmix(anchor, neighbour, tf.constant([3, 9]))
    a2, l2 = cm.cutmix(anchor, neighbour, tf.constant([3, 9], tf.int64))
    a3, l3 = tf.function(cm.cutmix)(anchor, neighbour, np.array([3, 9]))
    np.testing.assert_array_equal(a1.numpy(), a2.numpy())
    np.testing.assert_array_equal(a1.numpy(), a3.numpy())
    assert float(l1) == float(l2) == float(l3)
    outs = {float(cm.cutmix(anchor, neighbour, tf.constant([s, 9]))[1]) for s in range(8)}
    assert len(outs) > 1


def test_xla_matches_eager_and_keeps_static_shapes():
    """jit_compile=True: static output shapes, same box as eager for the same seed (negative and 64-bit seeds
    included: they are reduced modulo 2³¹ first), λ′ still the measured fraction; seed=None also compiles."""
    anchor, neighbour = _pair(2, 24, 40)
    xla = tf.function(cm.cutmix, jit_compile=True)
    for seed in ([0, 0], [1, 2], [-5, 3], [123456, -99], [2 ** 40 + 3, 2 ** 62]):
        seed = tf.constant(seed, tf.int64)
        mx, lx = xla(anchor, neighbour, seed)
        me, le = cm.cutmix(anchor, neighbour, seed)
        assert mx.shape == (2, 24, 40, 3)
        np.testing.assert_array_equal(mx.numpy(), me.numpy())
        np.testing.assert_allclose(float(lx), float(le), rtol=0, atol=1e-6)
        np.testing.assert_allclose(float(lx), np.mean(mx.numpy() == ANCHOR), rtol=0, atol=1e-6)

    graph = xla.get_concrete_function(tf.TensorSpec([2, 24, 40, 3]), tf.TensorSpec([2, 24, 40, 3]),
                                      tf.TensorSpec([2], tf.int32))
    assert graph.structured_outputs[0].shape == (2, 24, 40, 3)
    unseeded = tf.function(lambda a, n: cm.cutmix(a, n), jit_compile=True)
    m, lam_prime = unseeded(anchor, neighbour)
    np.testing.assert_allclose(float(lam_prime), np.mean(m.numpy() == ANCHOR), rtol=0, atol=1e-6)


def test_unseeded_calls_vary_and_dtype_is_kept():
    anchor, neighbour = _pair(1, 32, 32)
    outs = {float(cm.cutmix(anchor, neighbour)[1]) for _ in range(10)}
    assert len(outs) > 1
    mixed, _ = cm.cutmix(tf.cast(anchor, tf.float64), tf.cast(neighbour, tf.float64), tf.constant([1, 1]))
    assert mixed.dtype == tf.float64
