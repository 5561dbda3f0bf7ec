"""Backbones: feature sizes, CIFAR vs ImageNet stem, width multiplier, stage-3 output, synchronized BN, heads."""
import keras
import numpy as np
import pytest

from tfssl.backbones import SyncBatchNormalization, build_backbone, build_mlp, feature_dim


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("small", 256),
                                      ("tiny", 64)])
def test_pooled_feature_size(name, dim):
    assert feature_dim(name) == dim
    model = build_backbone(name, cifar_stem=True)
    assert model(np.zeros((2, 32, 32, 3), "float32")).shape == (2, dim)


def test_small_is_tiny_at_four_times_the_width_and_takes_28_px_gray_images():
    """``small`` (the Fashion-MNIST recipes' backbone) has tiny's layout at widths 32-64-128-256, stem included, and
    runs on the recipes' native 28×28×1 images."""
    small, wide_tiny = build_backbone("small", channels=1), build_backbone("tiny", width=4.0, channels=1)
    assert [w.shape for w in small.weights] == [w.shape for w in wide_tiny.weights]
    assert small.get_layer("stem_conv").kernel.shape == (3, 3, 1, 32)
    assert small(np.zeros((2, 28, 28, 1), "float32")).shape == (2, 256)


def test_stems_and_stage3_map():
    cifar = build_backbone("resnet18", cifar_stem=True, with_stage3=True)
    pooled, stage3 = cifar(np.zeros((1, 32, 32, 3), "float32"))
    assert pooled.shape == (1, 512) and stage3.shape == (1, 8, 8, 256)        # strides 1,2,2 at stages 1-3
    imagenet = build_backbone("resnet50", cifar_stem=False, with_stage3=True)
    _, stage3 = imagenet(np.zeros((1, 224, 224, 3), "float32"))
    assert stage3.shape == (1, 14, 14, 1024)                                   # the map CsMl's head reads


def test_width_multiplier_and_channels():
    model = build_backbone("resnet18", width=0.5, channels=1)
    assert model(np.zeros((1, 28, 28, 1), "float32")).shape == (1, feature_dim("resnet18", 0.5)) == (1, 256)
    assert model.count_params() < build_backbone("resnet18").count_params() / 3


def test_sync_bn_option_and_normalisation_inside():
    sync = build_backbone("tiny", sync_bn=True)
    plain = build_backbone("tiny", sync_bn=False)
    assert any(isinstance(l, SyncBatchNormalization) for l in sync.layers)
    assert not any(isinstance(l, SyncBatchNormalization) for l in plain.layers)
    norm = build_backbone("tiny", mean=(0.2,) * 3, std=(0.5,) * 3).get_layer("normalize")
    out = norm(np.full((1, 2, 2, 3), 0.7, "float32")).numpy()
    np.testing.assert_allclose(out, 1.0, rtol=1e-5)                            # (0.7 − 0.2) / 0.5


def test_sync_bn_on_one_replica_equals_keras_bn():
    x = np.random.default_rng(0).normal(2.0, 0.01, (16, 4, 4, 3)).astype("float32")
    a, b = SyncBatchNormalization(), __import__("keras").layers.BatchNormalization()
    # mean 2, std 0.01: float32's spacing at 2 (2.4e-7) is 2.4e-5 in normalised units, so both layers (TF's fused
    # kernel on one replica, Keras's moments) are within that of each other and of the float64 result
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-3)
    np.testing.assert_allclose(a(x, training=True), b(x, training=True), atol=3e-5)
    np.testing.assert_allclose(a(x, training=True), ref, atol=3e-5)


def test_mlp_head_layout():
    head = build_mlp([32, 8], batch_norm=True)
    head.build((None, 16))
    kinds = [next(k for k in ("Dense", "BatchNormalization", "ReLU") if isinstance(l, getattr(keras.layers, k)))
             for l in head.layers]                     # tfssl's BatchNorm subclasses Keras's
    assert kinds == ["Dense", "BatchNormalization", "ReLU", "Dense"]
    assert not head.layers[0].use_bias and head.layers[-1].use_bias
    assert head(np.zeros((3, 16), "float32")).shape == (3, 8)


def test_sync_bn_two_replicas_equal_one_when_variance_is_small(mirrored):
    """Mean 3, std 0.003: E[x²]−E[x]² in float32 loses most digits; the two-pass statistics must not."""
    import tensorflow as tf
    x = np.random.default_rng(1).normal(3.0, 0.003, (8, 2, 2, 4)).astype("float32")
    expected = tf.nn.moments(tf.constant(x, tf.float64), [0, 1, 2])
    with mirrored.scope():
        layer = SyncBatchNormalization()
        layer.build(x.shape)

    halves = mirrored.experimental_distribute_values_from_function(
        lambda ctx: x[ctx.replica_id_in_sync_group * 4:(ctx.replica_id_in_sync_group + 1) * 4])
    moments = mirrored.run(tf.function(lambda v: layer._moments(v, None)), args=(halves,))
    for replica in range(2):
        mean, var = (mirrored.experimental_local_results(m)[replica].numpy() for m in moments)
        np.testing.assert_allclose(mean, expected[0].numpy(), rtol=1e-6)
        np.testing.assert_allclose(var, expected[1].numpy(), rtol=1e-3)


def test_initialisation_is_per_layer_and_follows_the_seed():
    import keras
    keras.utils.set_random_seed(0)
    a = build_backbone("tiny")
    keras.utils.set_random_seed(0)
    b = build_backbone("tiny")
    keras.utils.set_random_seed(1)
    c = build_backbone("tiny")
    w = {v.path: v.numpy() for v in a.weights}
    assert not np.array_equal(w["s1b1_conv1/kernel"], w["s1b1_conv2/kernel"])   # same shape, own draw
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])
