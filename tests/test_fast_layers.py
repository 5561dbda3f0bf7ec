"""tfssl's backbone layers with their own training kernels (bench/NOTES.md §4, §5).

BatchNorm, both kernels (the closed-form gradient used under XLA, TF's FusedBatchNormV3 otherwise): forward against
numpy float64, gradients against autodiff of the textbook formula in float64 (and finite differences), the layer
against Keras's BatchNormalization (outputs, moving statistics, gradients), eagerly and under XLA; inference,
masks and exports keep Keras's behaviour; a method's compile picks the kernel. Conv2D with the kernel
gradient summed over batch chunks: against autodiff of ``tf.nn.conv2d`` for every kernel/stride/remainder case."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl.backbones import (ChunkedGradConv2D, FusedBatchNormalization, SyncBatchNormalization, batch_norm_fused,
                             batch_norm_train, batch_norm_xla_forward, build_backbone, conv2d_chunked_grad)
from tfssl.export import plain_backbone

SHAPES = [(7, 5), (4, 3, 3, 6), (16, 8, 8, 32), (2, 1, 1, 3)]
KERNELS = {"closed_form": batch_norm_train, "fused_v3": batch_norm_fused, "xla_forward": batch_norm_xla_forward}


def _inputs(shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, c) + rng.uniform(-2, 2, c)   # per-channel scale, offset
    return x, rng.uniform(0.5, 1.5, c), rng.standard_normal(c), rng.standard_normal(shape)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_numpy_float64(shape, kernel):
    x, gamma, beta, _ = _inputs(shape, 0)
    axes = tuple(range(len(shape) - 1))
    mean, var = x.mean(axes), x.var(axes)
    ref = gamma * (x - mean) / np.sqrt(var + 1e-5) + beta
    y, m, v = KERNELS[kernel](*(tf.constant(a, tf.float32) for a in (x, gamma, beta)), 1e-5)
    assert y.shape == x.shape
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(m.numpy(), mean, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(v.numpy(), var, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel,dtype", [("closed_form", tf.float64), ("closed_form", tf.float32),
                                          ("fused_v3", tf.float32), ("xla_forward", tf.float32)])   # no float64
def test_gradients_match_autodiff_of_the_formula(shape, kernel, dtype):
    x, gamma, beta, upstream = _inputs(shape, 1)
    axes = list(range(len(shape) - 1))

    def reference(x, gamma, beta):                    # what Keras's layer differentiates
        mean, var = tf.nn.moments(x, axes)
        return tf.nn.batch_normalization(x, mean, var, beta, gamma, 1e-5)

    grads = {}
    for name, fn, dt in (("ours", lambda *a: KERNELS[kernel](*a, 1e-5)[0], dtype), ("reference", reference, tf.float64)):
        args = [tf.constant(a, dt) for a in (x, gamma, beta)]
        with tf.GradientTape() as tape:
            tape.watch(args)
            loss = tf.reduce_sum(tf.tanh(fn(*args)) * tf.constant(upstream, dt))  # non-linear: upstream varies
        grads[name] = [g.numpy() for g in tape.gradient(loss, args)]
    tol = 1e-10 if dtype == tf.float64 else 2e-4
    for got, want in zip(grads["ours"], grads["reference"]):
        np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=tol)


def test_gradient_matches_finite_differences():
    x, gamma, beta, upstream = _inputs((3, 2, 2, 2), 2)
    w = tf.constant(upstream)
    f = lambda x, g, b: tf.reduce_sum(tf.sin(batch_norm_train(x, g, b, 1e-5)[0]) * w)   # noqa: E731
    theoretical, numerical = tf.test.compute_gradient(f, [tf.constant(a) for a in (x, gamma, beta)], delta=1e-6)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, atol=1e-6)


@pytest.mark.parametrize("jit,bn_kernel", [(False, "fused_v3"), (True, "closed_form"), (True, "fused_v3"),
                                           (False, "xla_forward"), (False, "stock"), (True, "stock")])
def test_layer_equals_keras_batch_normalization(jit, bn_kernel):
    x, _, _, upstream = _inputs((8, 4, 4, 6), 3)
    x, w = tf.constant(x, tf.float32), tf.constant(upstream, tf.float32)
    layers = {}
    for cls in (FusedBatchNormalization, keras.layers.BatchNormalization):
        layer = cls(momentum=0.9, epsilon=1e-5)
        layer.kernel = bn_kernel
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 1.5, 6))
        layer.beta.assign(np.linspace(-1, 1, 6))
        layers[cls] = layer

    def step(layer):
        @tf.function(jit_compile=jit)
        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.nn.relu(y) * w)
            return [y] + tape.gradient(loss, [x, layer.gamma, layer.beta])
        return [t.numpy() for t in run(x)]
    ours, keras_ = step(layers[FusedBatchNormalization]), step(layers[keras.layers.BatchNormalization])
    for a, b in zip(ours, keras_):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(layers[FusedBatchNormalization].non_trainable_weights,
                    layers[keras.layers.BatchNormalization].non_trainable_weights):   # moving mean, variance
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, rtol=1e-5)
        assert not np.allclose(a.numpy(), [0.0, 1.0][int("variance" in a.path)])   # the update did happen
    # inference uses the moving statistics, exactly as Keras
    np.testing.assert_allclose(layers[FusedBatchNormalization](x, training=False).numpy(),
                               layers[keras.layers.BatchNormalization](x, training=False).numpy(), atol=1e-6)


@pytest.mark.parametrize("bn_kernel", ["fused_v3", "closed_form", "xla_forward"])
def test_mixed_precision_inputs_keep_float32_statistics(bn_kernel):
    layer = FusedBatchNormalization(momentum=0.9, dtype="mixed_float16")
    layer.kernel = bn_kernel
    x = tf.constant(np.random.default_rng(4).standard_normal((16, 5)) * 100 + 1000, tf.float16)
    y = layer(x, training=True)
    assert y.dtype == tf.float16 and layer.moving_mean.dtype == tf.float32
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * x.numpy().astype("float64").mean(0), rtol=1e-3)


@pytest.mark.parametrize("jit", [False, True])
def test_a_methods_train_function_picks_the_kernel(jit):
    from tfssl import config, methods, optim
    cfg = config.from_dict({"method": {"name": "simclr"}, "model": {"backbone": "tiny", "projector_hidden": 16,
                                                                    "projector_bn": True}})
    model = methods.build(cfg, num_classes=10, total_steps=10)
    model.compile(optim.SGD(0.1, momentum=0.9), jit_compile=jit)
    bns = [l for l in model._flatten_layers() if isinstance(l, FusedBatchNormalization)]
    convs = [l for l in model._flatten_layers() if isinstance(l, ChunkedGradConv2D)]
    assert len(bns) > 5 and len(convs) > 5
    assert {l.kernel for l in bns} == {"fused_v3"} and {l.chunk_bytes for l in convs} == {8 << 20}   # class default
    model.make_train_function()                          # this CPU's plan for an XLA or a graph step
    from tfssl import devices
    assert {l.kernel for l in bns} == {"closed_form" if jit else devices.CPU_GRAPH_BN[devices.detect().cpu_kind][0]}
    assert {l.chunk_bytes for l in convs} == {(2 if jit else 8) << 20}
    assert model.kernel_plan.jit is jit and model.kernel_plan.conv == "chunked"


def test_a_nan_image_makes_every_feature_nan_under_xla():
    """Batch statistics mix the images: one NaN image makes the whole batch NaN (the closed-form BatchNorm of XLA
    steps). In the TF graph Grappler fuses BatchNorm with the following ReLU, whose oneDNN kernel maps NaN to 0, so
    there a NaN row may end as zeros; the train step's loss carries the views and the gradients instead
    (test_nan.py: a NaN the fused ReLU hides still stops training)."""
    model = build_backbone("tiny")
    for layer in model.layers:
        if isinstance(layer, FusedBatchNormalization):
            layer.kernel = "closed_form"
    x = np.random.default_rng(6).uniform(0, 1, (8, 32, 32, 3)).astype("float32")
    x[3] = np.nan
    features = tf.function(lambda x: model(x, training=True), jit_compile=True)(tf.constant(x)).numpy()
    assert np.isnan(features).any(axis=1).all()


@pytest.mark.parametrize("xla,chunks", [(True, 4), (False, 1)])
def test_conv_layer_chunk_budget_follows_xla(xla, chunks):
    """1 MB per image: 2 MB chunks under XLA (4 kernel-gradient convolutions for 8 images), 8 MB otherwise (1)."""
    layer = ChunkedGradConv2D(4, 3, padding="same", use_bias=False)
    layer.build((None, 64, 64, 64))
    layer.chunk_bytes = (2 if xla else 8) << 20
    x = tf.zeros((8, 64, 64, 64))

    @tf.function
    def kernel_grad(x):
        with tf.GradientTape() as tape:
            y = layer(x)
        return tape.gradient(y, layer.kernel)
    graph = kernel_grad.get_concrete_function(x).graph
    ops = [op for f in [graph] + [graph._functions[k].graph for k in graph._functions] for op in f.get_operations()]
    assert sum(op.type == "Conv2DBackpropFilter" for op in ops) == chunks


def test_masked_and_frozen_calls_fall_back_to_keras():
    x = tf.constant(np.random.default_rng(5).standard_normal((2, 6, 3)), tf.float32)
    mask = tf.constant([[True] * 4 + [False] * 2, [True] * 6])
    ours, ref = FusedBatchNormalization(), keras.layers.BatchNormalization()
    np.testing.assert_allclose(ours(x, training=True, mask=mask).numpy(),
                               ref(x, training=True, mask=mask).numpy(), atol=1e-5)
    ours.trainable = False                               # a frozen layer normalises with its moving statistics
    np.testing.assert_allclose(ours(x, training=True).numpy(), ref(x, training=False).numpy(), atol=1e-6)


@pytest.mark.parametrize("sync", [False, True])
def test_backbones_use_it_and_exports_swap_it_for_the_stock_layer(sync):
    model = build_backbone("tiny", sync_bn=sync)
    kinds = {type(l) for l in model.layers if isinstance(l, keras.layers.BatchNormalization)}
    assert kinds == {SyncBatchNormalization if sync else FusedBatchNormalization}
    assert {type(l) for l in model.layers if isinstance(l, keras.layers.Conv2D)} == {ChunkedGradConv2D}
    plain = plain_backbone(model)
    assert {type(l) for l in plain.layers if isinstance(l, keras.layers.BatchNormalization)} == \
        {keras.layers.BatchNormalization}
    assert {type(l) for l in plain.layers if isinstance(l, keras.layers.Conv2D)} == {keras.layers.Conv2D}
    x = np.random.default_rng(6).uniform(0, 1, (4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(plain(x, training=True).numpy(), model(x, training=True).numpy(), atol=1e-5)


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 8), (3, 2, 8), (1, 2, 8), (3, 2, 7), (1, 1, 5)])
@pytest.mark.parametrize("dtype,jit", [(tf.float64, False), (tf.float32, False), (tf.float32, True)])
def test_chunked_kernel_gradient_matches_autodiff(kernel, stride, size, dtype, jit):
    rng = np.random.default_rng(kernel * 10 + stride + size)
    x = tf.constant(rng.standard_normal((7, size, size, 3)), dtype)          # 7 rows: chunks of 2 + a remainder
    w = tf.constant(rng.standard_normal((kernel, kernel, 3, 4)) * 0.3, dtype)
    upstream = tf.constant(rng.standard_normal((7, -(-size // stride), -(-size // stride), 4)), dtype)
    chunk_bytes = 2 * size * size * 3 * dtype.size

    def grads(conv):
        @tf.function(jit_compile=jit)
        def run(x, w):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                loss = tf.reduce_sum(tf.tanh(conv(x, w)) * upstream)
            return [conv(x, w)] + tape.gradient(loss, [x, w])
        return [t.numpy() for t in run(x, w)]
    ours = grads(lambda x, w: conv2d_chunked_grad(x, w, stride, chunk_bytes=chunk_bytes))
    reference = grads(lambda x, w: tf.nn.conv2d(x, w, stride, "SAME"))
    tol = 1e-10 if dtype == tf.float64 else 1e-5
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=tol)


def test_chunked_conv_layer_falls_back_for_other_convolutions():
    x = tf.constant(np.random.default_rng(7).standard_normal((2, 6, 6, 3)), tf.float32)
    for kw in (dict(padding="valid"), dict(dilation_rate=2, padding="same"), dict(strides=(1, 2), padding="same")):
        ours, ref = ChunkedGradConv2D(4, 3, **kw), keras.layers.Conv2D(4, 3, **kw)
        ours.build(x.shape)
        ref.build(x.shape)
        ref.set_weights(ours.get_weights())
        np.testing.assert_allclose(ours(x).numpy(), ref(x).numpy(), atol=1e-6)


def test_bf16_activations_enter_fused_batch_norm_directly_and_match_float64():
    """Under mixed_bfloat16 the graph kernel feeds bf16 x to FusedBatchNormV3 (no cast, float32 statistics):
    output, batch statistics and the input gradient match the float64 formula on the same bf16 values."""
    layer = FusedBatchNormalization(momentum=0.0, epsilon=1e-5, dtype="mixed_bfloat16")
    rng = np.random.default_rng(11)
    x = tf.cast(rng.normal(1.0, 2.0, (16, 5, 5, 6)).astype("float32"), tf.bfloat16)
    dy = rng.normal(0, 1, (16, 5, 5, 6))
    layer.build(x.shape)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy.astype("float32"))
    dx = tape.gradient(loss, x)
    assert y.dtype == tf.bfloat16 and dx.dtype == tf.bfloat16
    x64 = x.numpy().astype("float64")
    mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
    ref = (x64 - mean) / np.sqrt(var + 1e-5)
    # d/dx of Σ dy·x̂ for batch-statistic BatchNorm (γ = 1)
    ref_dx = (dy - dy.mean((0, 1, 2)) - ref * (dy * ref).mean((0, 1, 2))) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(y.numpy().astype("float64"), ref, atol=0.03)        # bf16 output: 8 bits
    np.testing.assert_allclose(dx.numpy().astype("float64"), ref_dx, atol=0.03 * np.abs(ref_dx).max())
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)     # float32 statistics
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-4)
