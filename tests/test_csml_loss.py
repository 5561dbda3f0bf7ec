"""CsMl loss (METHODS.md "CsMl" step 5) against an independent float64 numpy reference written from the equation.

The reference never calls tfssl: ℓ(q,k) = −log exp(q·k/τ) / (exp(q·k/τ) + Σ_{n∈queue} exp(q·n/τ)), per row, with
a stable logsumexp, and L = [w0·ℓ(qi,ki) + w1·ℓ(qi,kj) + w0·ℓ(qj,kj) + w1·ℓ(qj,ki) + λ′·ℓ(qm,ki) + (1−λ′)·ℓ(qm,kj)] / 3.
"""
import numpy as np
import pytest
import tensorflow as tf

from tfssl import losses

TOL = 1e-5          # float32 library vs float64 reference
TOL64 = 1e-10       # float64 library vs float64 reference
PHASES = [(1.0, 0.0), (0.5, 0.5)]        # warm-up epochs 0–10, afterwards
LAMS = [0.0, 0.3, 0.5, 0.87, 1.0]


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_info_nce(q, k, queue, tau):
    """Per-row ℓ_b = logsumexp([q_b·k_b, q_b·queue_1, …]/τ) − q_b·k_b/τ, with the max subtracted. Returns [B]."""
    out = np.empty(q.shape[0])
    for b in range(q.shape[0]):
        logits = np.concatenate([[q[b] @ k[b]], queue @ q[b]]) / tau
        m = logits.max()
        out[b] = m + np.log(np.sum(np.exp(logits - m))) - logits[0]
    return out


def ref_csml_terms(qi, qj, qm, ki, kj, queue, tau, w0, w1, lam):
    a = [np.float64(x) for x in (qi, qj, qm, ki, kj, queue)]
    qi, qj, qm, ki, kj, queue = a
    l = lambda q, k: ref_info_nce(q, k, queue, tau)  # noqa: E731
    return (w0 * l(qi, ki) + w1 * l(qi, kj) + w0 * l(qj, kj) + w1 * l(qj, ki)
            + lam * l(qm, ki) + (1 - lam) * l(qm, kj)) / 3


def ref_csml_loss(*args):
    return float(np.mean(ref_csml_terms(*args)))


def _inputs(seed, b=6, k=20, d=8):
    rng = np.random.default_rng(seed)
    return [_unit(rng, b, d) for _ in range(5)] + [_unit(rng, k, d)]


def test_reference_sanity():
    """Empty queue: every ℓ is −log 1 = 0. Identical q, k, all queue rows: ℓ = log(K+1). Weights sum: with all ℓ
    equal to c the loss is c·(2·w0 + 2·w1 + 1)/3."""
    x = _inputs(0)
    assert np.allclose(ref_csml_terms(*x[:5], np.zeros((0, 8)), 0.2, 0.5, 0.5, 0.3), 0.0)
    v = x[0][:1]
    same = [np.tile(v, (3, 1))] * 5 + [np.tile(v, (7, 1))]
    for w0, w1 in PHASES:
        np.testing.assert_allclose(ref_csml_terms(*same, 0.2, w0, w1, 0.4), np.log(8) * (2 * w0 + 2 * w1 + 1) / 3,
                                   rtol=1e-12)


@pytest.mark.parametrize("w0,w1", PHASES)
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("tau", [0.2, 0.07])
def test_matches_reference_float64_and_float32(w0, w1, lam, tau):
    x = _inputs(int(100 * lam) + 7 * int(10 * w0))
    expected = ref_csml_terms(*x, tau, w0, w1, lam)
    got64 = losses.csml_terms(*[tf.constant(v) for v in x], tau, w0, w1, lam)
    assert got64.dtype == tf.float64 and got64.shape == (6,)
    np.testing.assert_allclose(got64.numpy(), expected, rtol=TOL64, atol=TOL64)
    x32 = [tf.constant(v, tf.float32) for v in x]
    np.testing.assert_allclose(losses.csml_terms(*x32, tau, w0, w1, lam).numpy(), expected, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(float(losses.csml_loss(*x32, tau, w0, w1, lam)), expected.mean(), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(float(losses.csml_loss(*[tf.constant(v) for v in x], tau, w0, w1, lam)),
                               expected.mean(), rtol=TOL64, atol=TOL64)


def test_weights_as_scalar_tensors_and_inside_tf_function():
    """w0, w1, λ′ as (float32) scalar tensors — e.g. a schedule variable and cutmix's λ′ — in a compiled graph."""
    x = [tf.constant(v, tf.float32) for v in _inputs(3)]
    fn = tf.function(losses.csml_loss, jit_compile=True)
    for (w0, w1), lam in [((1.0, 0.0), 0.25), ((0.5, 0.5), 0.9)]:
        got = fn(*x, 0.2, tf.constant(w0), tf.Variable(w1), tf.constant(lam, tf.float32))
        np.testing.assert_allclose(float(got), ref_csml_loss(*_inputs(3), 0.2, w0, w1, lam), rtol=TOL, atol=TOL)
    x64 = [tf.constant(v) for v in _inputs(3)]
    got = losses.csml_loss(*x64, 0.2, tf.constant(0.5), tf.constant(0.5), tf.constant(0.3, tf.float32))
    np.testing.assert_allclose(float(got), ref_csml_loss(*_inputs(3), 0.2, 0.5, 0.5, np.float32(0.3)),
                               rtol=TOL64, atol=TOL64)


def test_each_term_is_in_the_sum():
    """Every one of the six (q, k) pairs contributes with its weight: compare with single-pair references."""
    x = _inputs(4)
    qi, qj, qm, ki, kj, queue = x
    l = lambda q, k: ref_info_nce(q, k, queue, 0.2)  # noqa: E731
    t = lambda *w: losses.csml_terms(*[tf.constant(v) for v in x], 0.2, *w).numpy()  # noqa: E731
    np.testing.assert_allclose(t(1.0, 0.0, 1.0), (l(qi, ki) + l(qj, kj) + l(qm, ki)) / 3, rtol=TOL64)
    np.testing.assert_allclose(t(0.0, 1.0, 0.0), (l(qi, kj) + l(qj, ki) + l(qm, kj)) / 3, rtol=TOL64)


@pytest.mark.parametrize("w0,w1", PHASES)
def test_no_gradient_to_keys_or_queue(w0, w1):
    x = _inputs(5)
    q = [tf.Variable(v) for v in x[:3]]
    k = [tf.Variable(v) for v in x[3:]]
    with tf.GradientTape(persistent=True) as tape:
        loss = losses.csml_loss(*q, *k, 0.2, w0, w1, 0.6)
    for var in k:                                                  # ki, kj, queue
        g = tape.gradient(loss, var)
        assert g is None or np.all(g.numpy() == 0.0)
    for var in q:
        assert np.max(np.abs(tape.gradient(loss, var).numpy())) > 1e-3


def test_no_gradient_to_keys_even_when_keys_are_the_queries():
    """ki = qi, kj = qj, queue built from qm: only the query arguments are differentiated."""
    x = _inputs(6)
    qi, qj, qm, _, _, queue = x
    vi, vj = tf.Variable(qi), tf.Variable(qj)
    with tf.GradientTape() as tape:
        loss = losses.csml_loss(vi, vj, tf.constant(qm), vi, vj, tf.constant(queue), 0.2, 0.5, 0.5, 0.4)
    gi = tape.gradient(loss, vi).numpy()
    eps = 1e-6
    fd = np.zeros_like(qi)
    for idx in np.ndindex(*qi.shape):
        p, m = qi.copy(), qi.copy()
        p[idx] += eps
        m[idx] -= eps
        fd[idx] = (ref_csml_loss(p, qj, qm, qi, qj, queue, 0.2, 0.5, 0.5, 0.4)
                   - ref_csml_loss(m, qj, qm, qi, qj, queue, 0.2, 0.5, 0.5, 0.4)) / (2 * eps)
    np.testing.assert_allclose(gi, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("w0,w1,lam", [(1.0, 0.0, 0.7), (0.5, 0.5, 0.0), (0.5, 0.5, 1.0)])
def test_query_gradients_match_finite_differences_float64(w0, w1, lam):
    x = _inputs(7, b=3, k=10, d=5)
    qs = [tf.Variable(v) for v in x[:3]]
    with tf.GradientTape() as tape:
        loss = losses.csml_loss(*qs, *[tf.constant(v) for v in x[3:]], 0.2, w0, w1, lam)
    grads = tape.gradient(loss, qs)
    eps = 1e-6
    for which in range(3):                                         # qi, qj, qm
        fd = np.zeros_like(x[which])
        for idx in np.ndindex(*x[which].shape):
            plus, minus = list(x), list(x)
            plus[which], minus[which] = x[which].copy(), x[which].copy()
            plus[which][idx] += eps
            minus[which][idx] -= eps
            fd[idx] = (ref_csml_loss(*plus, 0.2, w0, w1, lam) - ref_csml_loss(*minus, 0.2, w0, w1, lam)) / (2 * eps)
        assert np.max(np.abs(fd)) > 1e-3
        np.testing.assert_allclose(grads[which].numpy(), fd, rtol=1e-6, atol=1e-8)


def test_warm_up_phase_uses_kj_only_in_its_own_pair_and_the_mix_term():
    """(w0, w1) = (1, 0): no cross-sample pair; kj enters only through ℓ(qj, kj) and (1−λ′)·ℓ(qm, kj). Replacing kj
    by unrelated keys changes each term by exactly Δℓ(qj, kj)/3 at λ′ = 1, plus (1−λ′)·Δℓ(qm, kj)/3 at λ′ < 1."""
    qi, qj, qm, ki, kj, queue = _inputs(8)
    kj2 = _unit(np.random.default_rng(99), *kj.shape)
    l = lambda q, k: ref_info_nce(q, k, queue, 0.2)  # noqa: E731

    def terms(kj_, lam):
        return losses.csml_terms(*[tf.constant(v) for v in (qi, qj, qm, ki, kj_, queue)], 0.2, 1.0, 0.0, lam).numpy()

    np.testing.assert_allclose(terms(kj2, 1.0) - terms(kj, 1.0), (l(qj, kj2) - l(qj, kj)) / 3, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(terms(kj2, 0.25) - terms(kj, 0.25),
                               (l(qj, kj2) - l(qj, kj) + 0.75 * (l(qm, kj2) - l(qm, kj))) / 3, rtol=1e-9, atol=1e-12)


def test_warm_up_with_lambda_one_unchanged_by_kj_outside_its_own_pair():
    """(1,0), λ′ = 1: the loss depends on kj only via ℓ(qj, kj). Perturb kj in a way that leaves qj·kj unchanged
    (a component orthogonal to qj, re-normalised with the same projection): the loss is unchanged, while the same
    perturbation does change the loss in phase (0.5, 0.5) (through ℓ(qi, kj)) and with λ′ < 1 (through ℓ(qm, kj))."""
    x = _inputs(9)
    qi, qj, qm, ki, kj, queue = x
    rng = np.random.default_rng(10)
    kj2 = np.empty_like(kj)
    for b in range(kj.shape[0]):                                   # same qj·kj, different direction elsewhere
        c = kj[b] @ qj[b]
        r = rng.standard_normal(kj.shape[1])
        r -= (r @ qj[b]) * qj[b]
        kj2[b] = c * qj[b] + np.sqrt(1 - c ** 2) * r / np.linalg.norm(r)
    np.testing.assert_allclose(np.sum(kj2 * qj, 1), np.sum(kj * qj, 1), atol=1e-12)
    assert np.max(np.abs(kj2 - kj)) > 0.1
    loss = lambda kj_, w0, w1, lam: float(losses.csml_loss(  # noqa: E731
        *[tf.constant(v) for v in (qi, qj, qm, ki, kj_, queue)], 0.2, w0, w1, lam))
    assert abs(loss(kj2, 1.0, 0.0, 1.0) - loss(kj, 1.0, 0.0, 1.0)) < 1e-12
    assert abs(loss(kj2, 0.5, 0.5, 1.0) - loss(kj, 0.5, 0.5, 1.0)) > 1e-4
    assert abs(loss(kj2, 1.0, 0.0, 0.5) - loss(kj, 1.0, 0.0, 0.5)) > 1e-4
