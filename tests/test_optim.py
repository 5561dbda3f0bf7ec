"""SGD (coupled weight decay, momentum, Nesterov), LARS, WarmupCosine, scaled_lr and build_optimizer against float64
numpy references of several steps (the references are written here from the update equations, not from tfssl)."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import optim
from tfssl.config import TrainConfig

SHAPES = [(4, 3), (6,), (), (2, 3, 2), (1, 5), (3, 3, 2, 4)]     # rank ≥ 2 gets wd / trust ratio; rank ≤ 1 does not
RTOL, ATOL = 2e-5, 1e-6


# ----------------------------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------------------------
def ref_sgd(params, grads_per_step, lrs, momentum, wd, nesterov):
    """PyTorch SGD with coupled L2: d = g + wd·θ (rank > 1 only); v ← μ·v + d; θ ← θ − lr·(d + μ·v if nesterov
    else v)."""
    params = [np.array(p, np.float64) for p in params]
    vel = [np.zeros_like(p) for p in params]
    for grads, lr in zip(grads_per_step, lrs):
        for i, g in enumerate(grads):
            d = np.float64(g) + (wd * params[i] if params[i].ndim > 1 else 0.0)
            vel[i] = momentum * vel[i] + d
            step = d + momentum * vel[i] if nesterov else vel[i]
            params[i] = params[i] - lr * step
    return params


def ref_lars(params, grads_per_step, lrs, momentum, wd, eta):
    """LARS: on rank > 1, d = g + wd·θ scaled by η·‖θ‖/‖d‖ (1 if either norm is 0); on rank ≤ 1, d = g (no wd,
    no trust ratio); then v ← μ·v + d; θ ← θ − lr·v."""
    params = [np.array(p, np.float64) for p in params]
    vel = [np.zeros_like(p) for p in params]
    for grads, lr in zip(grads_per_step, lrs):
        for i, g in enumerate(grads):
            g = np.float64(g)
            if params[i].ndim > 1:
                d = g + wd * params[i]
                wn, dn = np.sqrt(np.sum(params[i] ** 2)), np.sqrt(np.sum(d ** 2))
                d = d * (eta * wn / dn if wn > 0 and dn > 0 else 1.0)
            else:
                d = g
            vel[i] = momentum * vel[i] + d
            params[i] = params[i] - lr * vel[i]
    return params


def ref_warmup_cosine(step, base, total, warmup, final=0.0):
    """Linear warm-up reaching ``base`` at the last warm-up step (lr = base·(k+1)/W for k < W), then
    final + (base − final)·½(1 + cos(π·min(1, (k − W)/(T − W))))."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _random_problem(seed, shapes=SHAPES, steps=5):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(steps)]
    return params, grads


def _run(optimizer, params, grads_per_step, names=None):
    """Apply the steps; variables of rank ≤ 1 are named like biases (the references leave them undecayed), or
    ``names`` gives each its name (the weight-decay scope goes by name: gamma, beta, bias)."""
    names = names or ["bias" if np.ndim(p) <= 1 else "kernel" for p in params]
    variables = [keras.Variable(p, dtype="float32", name=n) for p, n in zip(params, names)]
    for grads in grads_per_step:
        optimizer.apply_gradients([(tf.constant(g), v) for g, v in zip(grads, variables)])
    return [v.numpy() for v in variables]


def _assert_all_close(got, expected, rtol=RTOL, atol=ATOL):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, i
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol, err_msg=f"variable {i} shape {e.shape}")


# ----------------------------------------------------------------------------------------------------------------
# SGD
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum,wd,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 5e-4, False),
                                                  (0.9, 0.1, False), (0.9, 0.1, True), (0.5, 1e-2, True),
                                                  (0.0, 0.3, False), (0.0, 0.3, True)])
def test_sgd_matches_reference(momentum, wd, nesterov):
    params, grads = _random_problem(1, steps=6)
    lr = 0.05
    opt = optim.SGD(learning_rate=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    got = _run(opt, params, grads)
    _assert_all_close(got, ref_sgd(params, grads, [lr] * 6, momentum, wd, nesterov))
    assert int(opt.iterations.numpy()) == 6


def test_sgd_weight_decay_skips_rank_le_1_and_applies_to_rank_gt_1():
    """Zero gradients: rank>1 variables shrink by exactly the coupled-L2 momentum recursion; rank ≤ 1 stay put."""
    shapes = [(3, 4), (4,), ()]
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    zeros = [[np.zeros(s, np.float32) for s in shapes] for _ in range(3)]
    got = _run(optim.SGD(0.1, momentum=0.9, weight_decay=0.5), params, zeros)
    np.testing.assert_array_equal(got[1], params[1])
    np.testing.assert_array_equal(got[2], params[2])
    # by hand: θ1 = θ0(1 − lr·wd) with v1 = wd·θ0; θ2 = θ1 − lr(μ·v1 + wd·θ1); ...
    theta, v = np.float64(params[0]), 0.0
    for _ in range(3):
        v = 0.9 * v + 0.5 * theta
        theta = theta - 0.1 * v
    np.testing.assert_allclose(got[0], theta, rtol=RTOL, atol=ATOL)
    assert not np.allclose(got[0], params[0])


@pytest.mark.parametrize("exclude,decayed", [(("bn", "bias"), ["kernel"]), ([], ["kernel", "gamma", "beta", "bias"]),
                                             (("bias",), ["kernel", "gamma", "beta"])])
@pytest.mark.parametrize("cls", [optim.SGD, optim.LARS])
def test_weight_decay_scope_follows_wd_exclude(cls, exclude, decayed):
    """train.wd_exclude: with zero gradients only weight decay moves a variable; the decayed ones follow the
    coupled-L2 recursion by hand (LARS: every decayed variable's step is lr·η·‖θ‖ along −θ), the others stay."""
    names = ["kernel", "gamma", "beta", "bias"]
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s).astype(np.float32) + 2.0 for s in [(3, 4), (4,), (4,), (4,)]]
    zeros = [[np.zeros_like(p) for p in params]]
    kw = dict(trust_coefficient=0.01) if cls is optim.LARS else {}
    got = _run(cls(0.1, momentum=0.9, weight_decay=0.5, wd_exclude=exclude, **kw), params, zeros, names)
    for name, before, after in zip(names, params, got):
        if name not in decayed:
            np.testing.assert_array_equal(after, before, err_msg=name)
        elif cls is optim.SGD:
            np.testing.assert_allclose(after, before * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_allclose(after, before * (1 - 0.1 * 0.01), rtol=1e-6, err_msg=name)
    assert cls(0.1, wd_exclude=exclude).get_config()["wd_exclude"] == list(exclude)


@pytest.mark.parametrize("make", [lambda: optim.SGD(0.1, momentum=0.9, weight_decay=0.5),
                                  lambda: optim.LARS(0.1, momentum=0.9, weight_decay=0.5, trust_coefficient=0.01)],
                         ids=["sgd", "lars"])
def test_weight_decay_scope_holds_on_every_replica(make, mirrored):
    """Under a strategy the update sees each replica's own component of a mirrored variable ("gamma/replica_1:0");
    the scope must still be the variable's, or the copies of an excluded variable drift apart (found by the
    launch-local test: replica 1's BatchNorm γ/β were decayed). Zero gradients, one step on 2 replicas: every copy
    equals the single-device update."""
    names = ["kernel", "gamma", "beta", "bias"]
    rng = np.random.default_rng(4)
    params = [rng.standard_normal(s).astype(np.float32) + 2.0 for s in [(3, 4), (4,), (4,), (4,)]]
    want = _run(make(), params, [[np.zeros_like(p) for p in params]], names)
    with mirrored.scope():
        variables = [keras.Variable(p, dtype="float32", name=n) for p, n in zip(params, names)]
        opt = make()
        opt.build(variables)

    @tf.function
    def step():
        def fn():
            opt.apply_gradients([(tf.zeros_like(v.value), v) for v in variables])
        mirrored.run(fn)
    step()
    for name, v, w, before in zip(names, variables, want, params):
        copies = [c.numpy() for c in mirrored.experimental_local_results(v.value)]
        assert len(copies) == 2
        for copy in copies:
            np.testing.assert_allclose(copy, w, rtol=1e-6, err_msg=name)
    assert not np.allclose(want[0], params[0]) and np.array_equal(want[1], params[1])


def test_build_optimizer_passes_the_recipe_scope():
    from tfssl import config
    for sets, scope in (([], ("bn", "bias")), (["train.wd_exclude=[]"], ())):
        cfg = config.load("ressl_fashion_mnist", sets)
        assert optim.build_optimizer(cfg.train, 10, 5).wd_exclude == scope
    assert config.load("ressl_cifar10").train.wd_exclude == [] and config.load("wcl_imagenet").train.wd_exclude == \
        ["bn", "bias"] and config.load("csml_imagenet").train.wd_exclude == []


def test_sgd_nesterov_differs_from_heavy_ball():
    params, grads = _random_problem(3, steps=3)
    a = _run(optim.SGD(0.1, momentum=0.9, weight_decay=0.0, nesterov=False), params, grads)
    b = _run(optim.SGD(0.1, momentum=0.9, weight_decay=0.0, nesterov=True), params, grads)
    assert max(np.max(np.abs(x - y)) for x, y in zip(a, b)) > 1e-2


def test_sgd_with_schedule_matches_reference():
    """The learning rate seen by step k is schedule(k) (iterations starts at 0)."""
    params, grads = _random_problem(4, steps=8)
    sched = optim.WarmupCosine(0.4, total_steps=8, warmup_steps=3, final=0.01)
    got = _run(optim.SGD(sched, momentum=0.9, weight_decay=1e-3, nesterov=True), params, grads)
    lrs = [ref_warmup_cosine(k, 0.4, 8, 3, 0.01) for k in range(8)]
    _assert_all_close(got, ref_sgd(params, grads, lrs, 0.9, 1e-3, True))


def test_sgd_get_config_round_trip():
    opt = optim.SGD(0.2, momentum=0.8, weight_decay=1e-4, nesterov=True)
    cfg = opt.get_config()
    assert cfg["momentum"] == 0.8 and cfg["weight_decay"] == 1e-4 and cfg["nesterov"] is True
    clone = optim.SGD.from_config(cfg)
    assert isinstance(clone, optim.SGD)
    assert (clone.momentum, clone.l2, clone.nesterov) == (0.8, 1e-4, True)
    np.testing.assert_allclose(float(clone.learning_rate), 0.2, rtol=1e-7)
    # with the schedule of build_optimizer (WarmupCosine is not registered, so it needs a custom-object scope)
    sched_opt = optim.SGD(optim.WarmupCosine(0.4, 10, 2, 0.01), momentum=0.9, weight_decay=1e-4)
    with keras.saving.custom_object_scope({"WarmupCosine": optim.WarmupCosine}):
        clone = optim.SGD.from_config(sched_opt.get_config())
    assert isinstance(clone._learning_rate, optim.WarmupCosine)
    assert clone._learning_rate.get_config() == {"base": 0.4, "total_steps": 10, "warmup_steps": 2, "final": 0.01}


# ----------------------------------------------------------------------------------------------------------------
# LARS
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum,wd,eta", [(0.9, 1e-6, 0.001), (0.9, 0.1, 0.02), (0.0, 0.0, 0.001),
                                             (0.5, 1e-2, 1.0)])
def test_lars_matches_reference(momentum, wd, eta):
    params, grads = _random_problem(5, steps=6)
    lr = 0.3
    opt = optim.LARS(learning_rate=lr, momentum=momentum, weight_decay=wd, trust_coefficient=eta)
    got = _run(opt, params, grads)
    _assert_all_close(got, ref_lars(params, grads, [lr] * 6, momentum, wd, eta))


def test_lars_rank_le_1_is_plain_momentum_sgd():
    """Rank ≤ 1 variables get neither weight decay nor trust ratio: identical to SGD without wd."""
    shapes = [(7,), ()]
    params, grads = _random_problem(6, shapes=shapes, steps=4)
    got = _run(optim.LARS(0.1, momentum=0.9, weight_decay=0.5, trust_coefficient=0.001), params, grads)
    _assert_all_close(got, ref_sgd(params, grads, [0.1] * 4, 0.9, 0.0, False))


def test_lars_trust_ratio_first_step_by_hand():
    """One step, no momentum: Δθ = −lr·η·‖θ‖·d/‖d‖, so ‖Δθ‖ = lr·η·‖θ‖ whatever the gradient scale."""
    rng = np.random.default_rng(7)
    theta = rng.standard_normal((5, 4)).astype(np.float32)
    for scale in (1e-3, 1.0, 1e3):
        g = (scale * rng.standard_normal((5, 4))).astype(np.float32)
        (got,) = _run(optim.LARS(0.5, momentum=0.0, weight_decay=1e-4, trust_coefficient=0.01), [theta], [[g]])
        step = np.float64(got) - np.float64(theta)
        np.testing.assert_allclose(np.linalg.norm(step), 0.5 * 0.01 * np.linalg.norm(np.float64(theta)), rtol=1e-5)
        d = np.float64(g) + 1e-4 * np.float64(theta)
        np.testing.assert_allclose(step, -0.5 * 0.01 * np.linalg.norm(np.float64(theta)) * d / np.linalg.norm(d),
                                   rtol=1e-4, atol=1e-7)


def test_lars_zero_weight_falls_back_to_trust_one():
    """‖θ‖ = 0 (e.g. a zero-initialised kernel): the trust ratio is 1 (a plain step), not 0 or NaN."""
    g = np.random.default_rng(8).standard_normal((3, 4)).astype(np.float32)
    (got,) = _run(optim.LARS(0.1, momentum=0.9, weight_decay=1e-2), [np.zeros((3, 4), np.float32)], [[g]])
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, -0.1 * g, rtol=1e-6)
    # and zero gradient with zero weights: nothing moves, nothing NaN
    (got,) = _run(optim.LARS(0.1, momentum=0.9, weight_decay=1e-2), [np.zeros((3, 4), np.float32)],
                  [[np.zeros((3, 4), np.float32)]])
    np.testing.assert_array_equal(got, 0.0)


def test_lars_defaults_and_config():
    opt = optim.LARS(0.1)
    assert isinstance(opt, optim.SGD)
    assert opt.momentum == 0.9 and opt.l2 == 1e-6 and opt.trust_coefficient == 0.001 and opt.nesterov is False
    clone = optim.LARS.from_config(optim.LARS(0.2, 0.8, 1e-3, trust_coefficient=0.02).get_config())
    assert isinstance(clone, optim.LARS)
    assert (clone.momentum, clone.l2, clone.trust_coefficient) == (0.8, 1e-3, 0.02)


# ----------------------------------------------------------------------------------------------------------------
# WarmupCosine and scaled_lr
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base,total,warmup,final", [(0.1, 100, 10, 0.0), (1.5, 37, 0, 0.0), (0.3, 50, 5, 1e-3),
                                                     (0.05, 20, 20, 0.0), (2.0, 1000, 1, 0.2)])
def test_warmup_cosine_matches_reference(base, total, warmup, final):
    sched = optim.WarmupCosine(base, total, warmup, final)
    steps = list(range(total + 5))
    got = np.array([float(sched(tf.constant(k, tf.int64))) for k in steps])
    expected = np.array([ref_warmup_cosine(k, base, total, warmup, final) for k in steps])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_warmup_cosine_shape():
    sched = optim.WarmupCosine(0.4, total_steps=100, warmup_steps=10, final=0.0)
    lr = np.array([float(sched(k)) for k in range(110)])
    assert np.all(np.diff(lr[:10]) > 0)                          # linear ramp up
    np.testing.assert_allclose(np.diff(lr[:10]), 0.04, rtol=1e-5)
    assert 0 < lr[0] <= 0.04 + 1e-7                               # starts near 0
    np.testing.assert_allclose(lr[9:11], 0.4, rtol=1e-6)          # peak at the end of warm-up
    assert np.all(np.diff(lr[10:101]) < 0)                        # cosine decay
    np.testing.assert_allclose(lr[55], 0.2, rtol=1e-5)            # half-way down at half the decay
    np.testing.assert_allclose(lr[100:], 0.0, atol=1e-7)          # held at final after total_steps
    assert lr.max() <= 0.4 + 1e-6
    assert sched.get_config() == {"base": 0.4, "total_steps": 100, "warmup_steps": 10, "final": 0.0}
    clone = optim.WarmupCosine.from_config(sched.get_config())
    np.testing.assert_allclose([float(clone(k)) for k in range(110)], lr, rtol=1e-7)


@pytest.mark.parametrize("lr,bs", [(0.06, 256), (0.3, 4096), (0.075, 512), (0.05, 8)])
def test_scaled_lr(lr, bs):
    assert optim.scaled_lr(lr, bs, "linear") == pytest.approx(lr * bs / 256.0, rel=1e-12)
    assert optim.scaled_lr(lr, bs, "sqrt") == pytest.approx(lr * math.sqrt(bs), rel=1e-12)
    assert optim.scaled_lr(lr, bs, "none") == lr


def test_scaled_lr_unknown_rule_raises():
    with pytest.raises((KeyError, ValueError)):
        optim.scaled_lr(0.1, 256, "quadratic")


# ----------------------------------------------------------------------------------------------------------------
# build_optimizer
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls", [("sgd", optim.SGD), ("lars", optim.LARS), ("lamb", keras.optimizers.Lamb)])
def test_build_optimizer_class_and_lr(name, cls):
    cfg = TrainConfig(optimizer=name, lr=0.3, batch_size=512, lr_scaling="linear", weight_decay=1e-4, momentum=0.8,
                      warmup_epochs=2.0)
    opt = optim.build_optimizer(cfg, total_steps=100, steps_per_epoch=10)
    assert type(opt) is cls
    sched = opt._learning_rate
    assert isinstance(sched, optim.WarmupCosine)
    assert sched.base == pytest.approx(0.6) and sched.total == 100 and sched.warmup == 20 and sched.final == 0.0
    # the optimizer's current lr follows the schedule: step 0 of a 20-step warm-up to 0.6
    np.testing.assert_allclose(float(opt.learning_rate), 0.6 / 20, rtol=1e-6)
    for k in (0, 19, 20, 60, 100):
        np.testing.assert_allclose(float(sched(k)), ref_warmup_cosine(k, 0.6, 100, 20), rtol=1e-5, atol=1e-7)
    if name in ("sgd", "lars"):
        assert opt.momentum == 0.8 and opt.l2 == 1e-4 and opt.nesterov is False
    if name == "lars":
        assert opt.trust_coefficient == 0.001
    if name == "lamb":
        assert opt.weight_decay == pytest.approx(1e-4)


@pytest.mark.parametrize("rule,expected", [("sqrt", 0.075 * math.sqrt(1024)), ("none", 0.075),
                                           ("linear", 0.075 * 4)])
def test_build_optimizer_scaling_rule_and_fractional_warmup(rule, expected):
    cfg = TrainConfig(optimizer="lars", lr=0.075, batch_size=1024, lr_scaling=rule, weight_decay=1e-6,
                      warmup_epochs=0.5)
    opt = optim.build_optimizer(cfg, total_steps=50, steps_per_epoch=7)
    assert opt._learning_rate.base == pytest.approx(expected) and opt._learning_rate.warmup == 4   # round(3.5) = 4


def test_build_optimizer_no_warmup_starts_at_base():
    cfg = TrainConfig(optimizer="sgd", lr=0.06, batch_size=256, lr_scaling="linear", warmup_epochs=0.0)
    opt = optim.build_optimizer(cfg, total_steps=10, steps_per_epoch=5)
    np.testing.assert_allclose(float(opt.learning_rate), 0.06, rtol=1e-6)


def test_build_optimizer_sgd_steps_match_reference():
    """End to end: the built SGD applies coupled wd + momentum under the warm-up + cosine schedule."""
    cfg = TrainConfig(optimizer="sgd", lr=0.1, batch_size=128, lr_scaling="linear", weight_decay=5e-3, momentum=0.9,
                      warmup_epochs=1.0)
    opt = optim.build_optimizer(cfg, total_steps=6, steps_per_epoch=2)
    params, grads = _random_problem(9, steps=6)
    got = _run(opt, params, grads)
    lrs = [ref_warmup_cosine(k, 0.05, 6, 2) for k in range(6)]
    _assert_all_close(got, ref_sgd(params, grads, lrs, 0.9, 5e-3, False))


def test_build_optimizer_lamb_without_weight_decay():
    cfg = TrainConfig(optimizer="lamb", weight_decay=0.0)
    opt = optim.build_optimizer(cfg, total_steps=10, steps_per_epoch=5)
    assert type(opt) is keras.optimizers.Lamb and not opt.weight_decay


def test_build_optimizer_unknown_name_raises():
    with pytest.raises(ValueError, match="adam"):
        optim.build_optimizer(TrainConfig(optimizer="adam"), total_steps=10, steps_per_epoch=5)
