"""Every method's whole train step (views in, EMA, teacher, loss, optimizer, queue, probe, metrics) compiles with
XLA (``jit_compile=True``) on the CPU — the TPU requirement: no host round-trips, static shapes — and computes the
same step as the uncompiled function, with views made in the pipeline or on the device (tfssl.devices decides when
XLA is used: tests/test_devices.py)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from tfssl import methods, view_ops
from tfssl.optim import SGD
from helpers import B, CASES, case_views as _views


# ------------------------------------------------------------------------------------ views on the device

def _raw_batch(cfg, seed=0):
    """uint8 images for on-device views: 4 distinct images and a noisy copy of each (WCL's 1-NN graph then has
    clear margins, as test_methods' crafted views), labels; CsMl gets anchors and neighbours."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (B // 2, 32, 32, 3))
    images = np.concatenate([base, base + rng.normal(0, 12, base.shape)]).clip(0, 255).astype("uint8")
    labels = rng.integers(0, 10, B).astype("int32")
    if cfg.method.method_name == "csml":
        return {"anchor": tf.constant(images), "neighbour": tf.constant(images[::-1].copy()),
                "label": tf.constant(labels)}
    return {"image": tf.constant(images), "label": tf.constant(labels)}


# Each method's richest variant: ReSSL multi-crop, SimCLR, MoCo v2 (symmetric: both directions), WCL with KNN crops,
# CsMl with its stage-3 level and the cross-sample phase on (CutMix). WCL and CsMl make their method-specific views on
# the device (KNN crops; anchor/neighbour pairs and CutMix); the other three take views made beforehand (the tf.data
# placement): their view layers compile with XLA and equal the tf.data views in test_views, and the on-device views
# inside the XLA step — the base class's path, the same for every method — train through `pretrain` in test_train's
# ReSSL short run (compiling the views once more per method here cost the suite ~1 minute)
XLA_CASES = [("pipeline", *CASES[i]) for i in (1, 2, 4)] + [("device", *CASES[i]) for i in (6, 8)]


@pytest.mark.slow
@pytest.mark.parametrize("feed,name,params", XLA_CASES, ids=lambda x: str(x))
def test_whole_train_step_compiles_with_xla_and_matches_the_graph_step(feed, name, params, monkeypatch):
    """Every method's whole step — views made on the device (random crops, colour, blur; CsMl's pairs and CutMix),
    EMA, teacher, loss, optimizer, queue, probe, metrics — compiles with XLA (the TPU requirement: no host
    round-trips, static shapes) and computes the same step as the graph without XLA from the same seed and state:
    the stateless views draw the same values in both. ``pipeline``: views made beforehand (the tf.data placement)."""
    keras.utils.set_random_seed(0)
    cfg = tiny_config(name, **params)
    on_device = feed == "device"
    # the graph step resamples crops with the XLA kernel's matmuls too (outside XLA tfssl uses crop_and_resize, equal
    # to float32 rounding: test_views): this test compares the steps, and WCL's graph and KNN-crop choice are
    # discrete, so a rounding-level difference in a view can flip an edge and move a few weights by 3e-3
    monkeypatch.setattr(view_ops, "in_xla", lambda: True)
    models = []
    for _ in range(2):
        with tf.distribute.get_strategy().scope():
            model = methods.build(cfg, num_classes=10, total_steps=10, steps_per_epoch=5,
                                  on_device_views=methods.views_for(cfg, 5) if on_device else None)
            model.compile(SGD(0.1, momentum=0.9, weight_decay=5e-4), probe_optimizer=SGD(0.1, momentum=0.9))
        if models:
            model.set_weights(models[0].get_weights())
        models.append(model)
    if on_device:
        batch = _raw_batch(cfg)
    else:
        views, labels = _views(cfg)
        batch = {"views": tuple(tf.constant(v) for v in views), "label": tf.constant(labels)}
    logs_xla = tf.function(models[0].train_step, jit_compile=True)(batch)   # raises if any op cannot compile
    logs_graph = tf.function(models[1].train_step)(batch)
    assert np.isfinite(float(logs_xla["loss"]))
    np.testing.assert_allclose(float(logs_xla["loss"]), float(logs_graph["loss"]), rtol=1e-4, atol=1e-4)
    # weights after the step: views made beforehand are bit-identical inputs (1e-4); views made on the device differ
    # by float32 rounding (~1e-5, XLA fuses the crop's matmuls differently), which the random-init step amplifies
    # in a few kernel entries (seen: 3e-4) — still a tenth of the update (lr·grad ≈ 2e-2), so a wrong view or
    # step shows
    atol = 2e-3 if on_device else 1e-4
    for a, b, v in zip(models[1].get_weights(), models[0].get_weights(), models[1].weights):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-3, err_msg=v.path)


def test_a_view_op_without_an_xla_kernel_is_one_clear_error_at_build_time():
    """``tf.image.crop_and_resize`` (today's crop before this change) has no XLA kernel: the check before training
    names the op and the settings to change instead of a graph traceback mid-training."""
    from tfssl import views as V
    from tfssl.config import ConfigError

    class OldCrop(V.RandomResizedCrop):
        def call(self, images):
            y0, x0, h, w = self.boxes(tf.shape(images)[0])
            return tf.image.crop_and_resize(images, tf.stack([y0, x0, y0 + h, x0 + w], 1),
                                            tf.range(tf.shape(images)[0]), [self.size, self.size])
    cfg = tiny_config("ressl", queue_size=32)
    views = methods.views_for(cfg)
    views.large[0] = keras.Sequential([OldCrop(32)] + views.large[0].layers[1:])
    model = methods.build(cfg, num_classes=10, on_device_views=views)
    model.compile(SGD(0.1), jit_compile=True)
    with pytest.raises(ConfigError, match=r"CropAndResize has no XLA kernel.*augment.on_device=false.*"
                                          r"train.jit_compile=false"):
        model.make_train_function()
    model.compile(SGD(0.1), jit_compile=False)        # without XLA the same views are fine
    model.make_train_function()
