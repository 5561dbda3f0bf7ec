"""Losses against independent float64 numpy references written from METHODS.md ("SimCLR", "MoCo v2", "ReSSL").

The references below are written directly from the equations with explicit per-row loops; they never call tfssl.
"""
import numpy as np
import pytest
import tensorflow as tf

from tfssl import losses

TOL = 1e-5          # float32 library vs float64 reference
TOL64 = 1e-10       # float64 library vs float64 reference


# ----------------------------------------------------------------------------------------------------------------
# Helpers and float64 references
# ----------------------------------------------------------------------------------------------------------------
def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _neg_log_ratio(num_logit, den_logits):
    """−log( exp(num) / Σ exp(den) ), computed stably in float64."""
    den_logits = np.asarray(den_logits, np.float64)
    m = max(np.max(den_logits), num_logit)
    return -(num_logit - m) + np.log(np.sum(np.exp(den_logits - m)))


def ref_contrastive_terms(anchors, candidates, positive_index, tau, self_index=None):
    """ℓ_i = −log exp(a_i·c_{p(i)}/τ) / Σ_{k≠s(i)} exp(a_i·c_k/τ)."""
    a, c = np.float64(anchors), np.float64(candidates)
    out = []
    for i in range(a.shape[0]):
        sims = np.array([a[i] @ c[k] for k in range(c.shape[0])]) / tau
        den = [sims[k] for k in range(c.shape[0]) if self_index is None or k != self_index[i]]
        out.append(_neg_log_ratio(sims[positive_index[i]], den))
    return np.array(out)


def ref_nt_xent_terms(z1_local, z2_local, z1_all, z2_all, offset, tau):
    """SimCLR NT-Xent: the 2B views are [z1_all; z2_all]; local row j of view v is global view offset+j+v·B;
    its positive is the other view of the same image; the denominator runs over all 2B views except itself.
    Anchors are ordered: all local view-1 rows, then all local view-2 rows."""
    z = np.concatenate([np.float64(z1_all), np.float64(z2_all)], 0)
    big_b = z1_all.shape[0]
    out = []
    for v, local in enumerate([np.float64(z1_local), np.float64(z2_local)]):
        for j in range(local.shape[0]):
            anchor = local[j]
            g = offset + j + v * big_b                   # the anchor's own column
            p = offset + j + (1 - v) * big_b             # the other view of the same image
            sims = z @ anchor / tau
            den = [sims[k] for k in range(2 * big_b) if k != g]
            out.append(_neg_log_ratio(sims[p], den))
    return np.array(out)


def ref_nt_xent_loss(z1, z2, tau):
    """Mean over the 2B anchors; written independently of ref_nt_xent_terms (positive = (i+B) mod 2B)."""
    z = np.concatenate([np.float64(z1), np.float64(z2)], 0)
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        sims = np.array([z[i] @ z[k] for k in range(n)]) / tau
        total += _neg_log_ratio(sims[(i + b) % n], [sims[k] for k in range(n) if k != i])
    return total / n


def ref_info_nce_loss(q, k, queue, tau):
    """ℓ = −log exp(q·k/τ) / (exp(q·k/τ) + Σ_{n∈queue} exp(q·n/τ)), batch mean."""
    q, k, queue = np.float64(q), np.float64(k), np.float64(queue)
    total = 0.0
    for i in range(q.shape[0]):
        pos = q[i] @ k[i] / tau
        negs = [q[i] @ queue[n] / tau for n in range(queue.shape[0])]
        total += _neg_log_ratio(pos, [pos] + negs)
    return total / q.shape[0]


def ref_ressl_loss(s, t, queue, tau_s, tau_t):
    """p_t = softmax(t·Mᵀ/τt), log p_s = log_softmax(s·Mᵀ/τs), L = mean_i −Σ_k p_t(i,k) log p_s(i,k)."""
    s, t, queue = np.float64(s), np.float64(t), np.float64(queue)
    total = 0.0
    for i in range(s.shape[0]):
        lt = queue @ t[i] / tau_t
        pt = np.exp(lt - lt.max())
        pt = pt / pt.sum()
        ls = queue @ s[i] / tau_s
        log_ps = ls - (ls.max() + np.log(np.sum(np.exp(ls - ls.max()))))
        total += -np.sum(pt * log_ps)
    return total / s.shape[0]


def _f32(x):
    return tf.constant(np.asarray(x, np.float32))


def _f64(x):
    return tf.constant(np.asarray(x, np.float64))


def test_reference_sanity():
    """The reference itself: NT-Xent of 2 views with B=1 has only the positive in the denominator → 0; InfoNCE with
    an empty queue → 0; ReSSL of a uniform teacher is the mean −log p_s."""
    rng = np.random.default_rng(0)
    z1, z2 = _unit(rng, 1, 4), _unit(rng, 1, 4)
    assert ref_nt_xent_loss(z1, z2, 0.3) == pytest.approx(0.0, abs=1e-12)
    assert ref_info_nce_loss(z1, z2, np.zeros((0, 4)), 0.3) == pytest.approx(0.0, abs=1e-12)
    q = _unit(rng, 5, 4)
    s = _unit(rng, 1, 4)
    ls = q @ s[0] / 0.1
    expected = -np.mean(ls - np.log(np.sum(np.exp(ls))))
    assert ref_ressl_loss(s, np.zeros((1, 4)), q, 0.1, 0.04) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# NT-Xent (SimCLR)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,d", [(1, 8), (2, 3), (8, 16), (5, 1), (16, 128)])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5, 1.0])
def test_nt_xent_loss_matches_reference(b, d, tau):
    rng = np.random.default_rng(100 * b + d)
    z1, z2 = _unit(rng, b, d), _unit(rng, b, d)
    expected = ref_nt_xent_loss(z1, z2, tau)
    got = float(losses.nt_xent_loss(_f32(z1), _f32(z2), temperature=tau))
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    got64 = float(losses.nt_xent_loss(_f64(z1), _f64(z2), temperature=tau))
    np.testing.assert_allclose(got64, expected, rtol=TOL64, atol=TOL64)


def test_nt_xent_default_temperature_is_0_1():
    rng = np.random.default_rng(1)
    z1, z2 = _unit(rng, 6, 8), _unit(rng, 6, 8)
    np.testing.assert_allclose(float(losses.nt_xent_loss(_f32(z1), _f32(z2))), ref_nt_xent_loss(z1, z2, 0.1),
                               rtol=TOL, atol=TOL)


def test_nt_xent_batch_of_one_is_zero():
    """B=1: the only other view is the positive, so each term is −log 1 = 0 (the self column must be excluded)."""
    rng = np.random.default_rng(2)
    z1, z2 = _unit(rng, 1, 8), _unit(rng, 1, 8)
    terms = losses.nt_xent_terms(_f32(z1), _f32(z2), _f32(z1), _f32(z2), 0, 0.1).numpy()
    assert terms.shape == (2,)
    np.testing.assert_allclose(terms, 0.0, atol=TOL)


def test_nt_xent_identical_views_finite_with_gradient():
    """All views identical at τ=0.01: the masked self column must not produce inf/NaN in the loss or gradient."""
    z = np.tile(_unit(np.random.default_rng(3), 1, 8), (4, 1))
    z1 = tf.Variable(z.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = losses.nt_xent_loss(z1, tf.constant(z, tf.float32), temperature=0.01)
    grad = tape.gradient(loss, z1)
    expected = ref_nt_xent_loss(z, z, 0.01)          # = log(2B−1), all logits equal
    np.testing.assert_allclose(float(loss), expected, rtol=TOL)
    np.testing.assert_allclose(expected, np.log(7), rtol=1e-12)
    assert np.all(np.isfinite(grad.numpy()))


@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("offset,b_local,big_b", [(0, 4, 8), (4, 4, 8), (2, 3, 8), (0, 1, 1), (7, 1, 8)])
def test_nt_xent_terms_with_offset_matches_reference(offset, b_local, big_b, tau):
    rng = np.random.default_rng(offset * 31 + b_local * 7 + big_b)
    z1_all, z2_all = _unit(rng, big_b, 6), _unit(rng, big_b, 6)
    z1, z2 = z1_all[offset:offset + b_local], z2_all[offset:offset + b_local]
    expected = ref_nt_xent_terms(z1, z2, z1_all, z2_all, offset, tau)
    for off in (offset, tf.constant(offset, tf.int32), tf.constant(offset, tf.int64)):
        got = losses.nt_xent_terms(_f32(z1), _f32(z2), _f32(z1_all), _f32(z2_all), off, tau).numpy()
        assert got.shape == (2 * b_local,)
        np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)


def test_nt_xent_terms_wrong_offset_differs():
    """Guard that the offset matters: the terms of the second half computed with offset 0 are wrong."""
    rng = np.random.default_rng(4)
    z1_all, z2_all = _unit(rng, 8, 6), _unit(rng, 8, 6)
    right = ref_nt_xent_terms(z1_all[4:], z2_all[4:], z1_all, z2_all, 4, 0.2)
    wrong = losses.nt_xent_terms(_f32(z1_all[4:]), _f32(z2_all[4:]), _f32(z1_all), _f32(z2_all), 0, 0.2).numpy()
    assert np.max(np.abs(wrong - right)) > 1e-2


def test_nt_xent_terms_split_halves_equal_full_batch():
    """Batch of 8 split into halves with offsets 0 and 4 against the full candidates: the concatenation
    [h0 view1, h1 view1, h0 view2, h1 view2] equals the full-batch terms [view1 rows 0..7, view2 rows 0..7]."""
    rng = np.random.default_rng(5)
    z1, z2 = _f32(_unit(rng, 8, 16)), _f32(_unit(rng, 8, 16))
    full = losses.nt_xent_terms(z1, z2, z1, z2, 0, 0.1).numpy()
    h0 = losses.nt_xent_terms(z1[:4], z2[:4], z1, z2, 0, 0.1).numpy()
    h1 = losses.nt_xent_terms(z1[4:], z2[4:], z1, z2, 4, 0.1).numpy()
    assert full.shape == (16,) and h0.shape == (8,) and h1.shape == (8,)
    reordered = np.concatenate([h0[:4], h1[:4], h0[4:], h1[4:]])
    np.testing.assert_allclose(reordered, full, rtol=1e-6, atol=1e-6)
    # and the global mean from the two shares equals nt_xent_loss
    np.testing.assert_allclose((h0.sum() + h1.sum()) / 16, float(losses.nt_xent_loss(z1, z2, 0.1)), rtol=1e-6)


def test_nt_xent_terms_offset_inside_tf_function():
    """Offset as a traced tensor with unknown batch size (the replica-offset case)."""
    rng = np.random.default_rng(6)
    z1_all, z2_all = _unit(rng, 8, 5), _unit(rng, 8, 5)

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32)] * 4 + [tf.TensorSpec([], tf.int32)])
    def fn(a, b, a_all, b_all, off):
        return losses.nt_xent_terms(a, b, a_all, b_all, off, 0.3)

    for off in (0, 2, 4):
        got = fn(_f32(z1_all[off:off + 4]), _f32(z2_all[off:off + 4]), _f32(z1_all), _f32(z2_all),
                 tf.constant(off)).numpy()
        expected = ref_nt_xent_terms(z1_all[off:off + 4], z2_all[off:off + 4], z1_all, z2_all, off, 0.3)
        np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------------------------------------------
# contrastive_terms (the general form)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (1, 5, 1), (4, 12, 8), (6, 40, 16)])
def test_contrastive_terms_no_self_mask(n, m, d, tau):
    rng = np.random.default_rng(n * 1000 + m * 10 + d)
    a, c = _unit(rng, n, d), _unit(rng, m, d)
    pos = rng.integers(0, m, n)
    expected = ref_contrastive_terms(a, c, pos, tau)
    got = losses.contrastive_terms(_f32(a), _f32(c), tf.constant(pos, tf.int32), tau).numpy()
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    got64 = losses.contrastive_terms(_f64(a), _f64(c), tf.constant(pos, tf.int32), tau).numpy()
    np.testing.assert_allclose(got64, expected, rtol=TOL64, atol=TOL64)


@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("n,m,d,offset", [(2, 12, 4, 0), (3, 12, 4, 5), (4, 16, 1, 8), (1, 2, 6, 1)])
def test_contrastive_terms_with_self_mask_and_offset(n, m, d, offset, tau):
    """Local anchors are candidate rows offset..offset+n-1 (gathered-candidate case): self excluded, positive is
    another column."""
    rng = np.random.default_rng(n * 100 + m + offset)
    c = _unit(rng, m, d)
    a = c[offset:offset + n]
    self_idx = np.arange(n) + offset
    pos = (self_idx + 1 + rng.integers(0, m - 1, n)) % m       # any column but self
    assert np.all(pos != self_idx)
    expected = ref_contrastive_terms(a, c, pos, tau, self_idx)
    got = losses.contrastive_terms(_f32(a), _f32(c), tf.constant(pos, tf.int32), tau,
                                   tf.constant(self_idx, tf.int32)).numpy()
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    got64 = losses.contrastive_terms(_f64(a), _f64(c), tf.constant(pos, tf.int32), tau,
                                     tf.constant(self_idx, tf.int32)).numpy()
    np.testing.assert_allclose(got64, expected, rtol=TOL64, atol=TOL64)
    # the self column really is excluded: without the mask the value differs
    unmasked = ref_contrastive_terms(a, c, pos, tau)
    assert np.all(np.abs(unmasked - expected) > 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# InfoNCE (MoCo v2)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.07, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("b,k,d", [(1, 4, 8), (4, 64, 16), (8, 8, 3), (3, 256, 1), (2, 1, 5), (16, 4096, 32)])
def test_info_nce_loss_matches_reference(b, k, d, tau):
    rng = np.random.default_rng(b * 10000 + k + d)
    q, key, queue = _unit(rng, b, d), _unit(rng, b, d), _unit(rng, k, d)
    expected = ref_info_nce_loss(q, key, queue, tau)
    got = float(losses.info_nce_loss(_f32(q), _f32(key), _f32(queue), temperature=tau))
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    got64 = float(losses.info_nce_loss(_f64(q), _f64(key), _f64(queue), temperature=tau))
    np.testing.assert_allclose(got64, expected, rtol=TOL64, atol=TOL64)


def test_info_nce_default_temperature_is_0_2_and_terms_shape():
    rng = np.random.default_rng(7)
    q, key, queue = _unit(rng, 5, 8), _unit(rng, 5, 8), _unit(rng, 20, 8)
    np.testing.assert_allclose(float(losses.info_nce_loss(_f32(q), _f32(key), _f32(queue))),
                               ref_info_nce_loss(q, key, queue, 0.2), rtol=TOL, atol=TOL)
    terms = losses.info_nce_terms(_f32(q), _f32(key), _f32(queue), 0.2).numpy()
    assert terms.shape == (5,)
    np.testing.assert_allclose(terms.mean(), ref_info_nce_loss(q, key, queue, 0.2), rtol=TOL, atol=TOL)
    for i in range(5):
        np.testing.assert_allclose(terms[i], ref_info_nce_loss(q[i:i + 1], key[i:i + 1], queue, 0.2),
                                   rtol=TOL, atol=TOL)


def test_info_nce_key_is_positive_not_queue():
    """The positive is the matching key: a query equal to its key scores lower than one equal to a queue row."""
    rng = np.random.default_rng(8)
    queue = _unit(rng, 16, 8)
    key = _unit(rng, 1, 8)
    good = float(losses.info_nce_loss(_f32(key), _f32(key), _f32(queue), 0.2))
    bad = float(losses.info_nce_loss(_f32(queue[:1]), _f32(key), _f32(queue), 0.2))
    assert good < bad
    np.testing.assert_allclose(good, ref_info_nce_loss(key, key, queue, 0.2), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(bad, ref_info_nce_loss(queue[:1], key, queue, 0.2), rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------------------------------------------
# ReSSL
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau_s,tau_t", [(0.1, 0.04), (0.2, 0.05), (0.5, 0.5), (1.0, 0.1), (0.07, 0.01)])
@pytest.mark.parametrize("b,k,d", [(1, 4, 8), (4, 64, 16), (8, 8, 3), (3, 32, 1), (16, 4096, 32)])
def test_ressl_loss_matches_reference(b, k, d, tau_s, tau_t):
    rng = np.random.default_rng(b * 10000 + k + d)
    s, t, queue = _unit(rng, b, d), _unit(rng, b, d), _unit(rng, k, d)
    expected = ref_ressl_loss(s, t, queue, tau_s, tau_t)
    got = float(losses.ressl_loss(_f32(s), _f32(t), _f32(queue), tau_s, tau_t))
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    got64 = float(losses.ressl_loss(_f64(s), _f64(t), _f64(queue), tau_s, tau_t))
    np.testing.assert_allclose(got64, expected, rtol=TOL64, atol=TOL64)


def test_ressl_defaults_are_paper_temperatures():
    """τs = 0.1, τt = 0.04 (METHODS.md)."""
    rng = np.random.default_rng(9)
    s, t, queue = _unit(rng, 4, 8), _unit(rng, 4, 8), _unit(rng, 32, 8)
    np.testing.assert_allclose(float(losses.ressl_loss(_f32(s), _f32(t), _f32(queue))),
                               ref_ressl_loss(s, t, queue, 0.1, 0.04), rtol=TOL, atol=TOL)


def test_ressl_is_asymmetric():
    """Swapping student and teacher changes the loss (different temperatures, teacher is the target)."""
    rng = np.random.default_rng(10)
    s, t, queue = _unit(rng, 4, 8), _unit(rng, 4, 8), _unit(rng, 32, 8)
    a = float(losses.ressl_loss(_f32(s), _f32(t), _f32(queue)))
    b = float(losses.ressl_loss(_f32(t), _f32(s), _f32(queue)))
    assert abs(a - b) > 1e-3
    np.testing.assert_allclose(b, ref_ressl_loss(t, s, queue, 0.1, 0.04), rtol=TOL, atol=TOL)


def test_ressl_gradient_teacher_zero_student_matches_finite_differences_float64():
    rng = np.random.default_rng(11)
    s, t, queue = _unit(rng, 3, 6), _unit(rng, 3, 6), _unit(rng, 16, 6)
    sv, tv, qv = tf.Variable(s), tf.Variable(t), tf.constant(queue)
    assert sv.dtype == tf.float64
    with tf.GradientTape(persistent=True) as tape:
        loss = losses.ressl_loss(sv, tv, qv, 0.1, 0.04)
    g_s = tape.gradient(loss, sv)
    g_t = tape.gradient(loss, tv, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    np.testing.assert_array_equal(g_t.numpy(), 0.0)

    eps = 1e-5
    fd = np.zeros_like(s)
    for idx in np.ndindex(*s.shape):
        plus, minus = s.copy(), s.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd[idx] = (ref_ressl_loss(plus, t, queue, 0.1, 0.04) - ref_ressl_loss(minus, t, queue, 0.1, 0.04)) / (2 * eps)
    assert np.max(np.abs(fd)) > 1e-2                        # the gradient is not trivially zero
    np.testing.assert_allclose(g_s.numpy(), fd, rtol=1e-6, atol=1e-8)


def test_ressl_gradient_student_float32_matches_finite_differences():
    rng = np.random.default_rng(12)
    s, t, queue = _unit(rng, 4, 8), _unit(rng, 4, 8), _unit(rng, 32, 8)
    sv, tv = tf.Variable(s.astype(np.float32)), tf.Variable(t.astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        loss = losses.ressl_loss(sv, tv, _f32(queue))
    g_s = tape.gradient(loss, sv).numpy()
    g_t = tape.gradient(loss, tv)
    assert g_t is None or np.all(g_t.numpy() == 0.0)

    s32 = s.astype(np.float32).astype(np.float64)
    t32 = t.astype(np.float32).astype(np.float64)
    q32 = queue.astype(np.float32).astype(np.float64)
    eps = 1e-3
    fd = np.zeros_like(s32)
    for idx in np.ndindex(*s32.shape):
        plus, minus = s32.copy(), s32.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd[idx] = (ref_ressl_loss(plus, t32, q32, 0.1, 0.04) - ref_ressl_loss(minus, t32, q32, 0.1, 0.04)) / (2 * eps)
    scale = np.max(np.abs(fd))
    assert scale > 1e-2
    np.testing.assert_allclose(g_s, fd, rtol=1e-3, atol=1e-3 * scale)


def test_ressl_gradient_does_not_flow_through_teacher_even_when_teacher_is_student():
    """Teacher = the same tensor as the student: only the student path contributes (stop-gradient on p_t)."""
    rng = np.random.default_rng(13)
    s, queue = _unit(rng, 3, 6), _unit(rng, 16, 6)
    sv = tf.Variable(s)
    with tf.GradientTape() as tape:
        loss = losses.ressl_loss(sv, sv, tf.constant(queue), 0.1, 0.04)
    g = tape.gradient(loss, sv).numpy()
    eps = 1e-5
    fd = np.zeros_like(s)
    for idx in np.ndindex(*s.shape):          # differentiate the student argument only, teacher held at s
        plus, minus = s.copy(), s.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd[idx] = (ref_ressl_loss(plus, s, queue, 0.1, 0.04) - ref_ressl_loss(minus, s, queue, 0.1, 0.04)) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ressl_finite_with_extreme_logits(dtype):
    """τt = 0.01 and identical vectors (student = teacher = every queue row): logits of 100, a one-hot-like teacher
    and saturated student; loss and gradient must stay finite and match the reference."""
    rng = np.random.default_rng(14)
    v = _unit(rng, 1, 8)
    s = np.tile(v, (4, 1))
    queue = np.concatenate([np.tile(v, (8, 1)), -np.tile(v, (8, 1)), _unit(rng, 16, 8)], 0)
    sv = tf.Variable(s.astype(dtype))
    for tau_s, tau_t in [(0.1, 0.01), (0.01, 0.01), (0.001, 0.001)]:
        with tf.GradientTape() as tape:
            loss = losses.ressl_loss(sv, tf.constant(s.astype(dtype)), tf.constant(queue.astype(dtype)), tau_s, tau_t)
        g = tape.gradient(loss, sv).numpy()
        assert np.isfinite(float(loss)), (tau_s, tau_t)
        assert np.all(np.isfinite(g)), (tau_s, tau_t)
        expected = ref_ressl_loss(s.astype(dtype), s.astype(dtype), queue.astype(dtype), tau_s, tau_t)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)
    # fully identical: every queue row is the student/teacher vector → uniform distributions, loss = log K
    queue_same = np.tile(v, (10, 1))
    loss = losses.ressl_loss(_f32(s), _f32(s), _f32(queue_same), 0.1, 0.01)
    np.testing.assert_allclose(float(loss), np.log(10), rtol=TOL)
    np.testing.assert_allclose(ref_ressl_loss(s, s, queue_same, 0.1, 0.01), np.log(10), rtol=1e-12)
