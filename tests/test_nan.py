"""train.on_nan: a non-finite loss stops training naming the step (stop), or the step is skipped whole — no update
of weights, optimizer slots, queue, BatchNorm statistics or probe — on every replica alike (skip)."""
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from tfssl import callbacks, methods
from tfssl.optim import SGD

B = 8


def _batch(seed, bad=None):
    """A ReSSL batch of two views; ``bad``: rows whose first view is NaN."""
    rng = np.random.default_rng(seed)
    views = [rng.uniform(0, 1, (B, 32, 32, 3)).astype("float32") for _ in range(2)]
    if bad is not None:
        views[0][bad] = np.nan
    return {"views": tuple(views), "label": rng.integers(0, 10, B).astype("int32")}


def _build(on_nan, strategy=None):
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = methods.build(_cfg(on_nan), num_classes=10, total_steps=10)
        model.compile(SGD(0.1, momentum=0.9, weight_decay=5e-4), probe_optimizer=SGD(0.1, momentum=0.9))
    return model


def _cfg(on_nan):
    cfg = tiny_config("ressl", queue_size=32)
    cfg.train.on_nan = on_nan
    return cfg


def _state(model):
    """Every variable the step may touch: model weights (incl. queue, BN statistics, probe) and optimizer slots."""
    values = [np.array(v) for v in model.get_weights()]
    for opt in (model.optimizer, model.probe_optimizer):   # the inner optimizers (the wrapper counts skips)
        values += [v.numpy() for v in opt.inner_optimizer.variables]
    return values


def _fit(model, batches, cbs=()):
    ds = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature={
        "views": (tf.TensorSpec((B, 32, 32, 3), tf.float32),) * 2, "label": tf.TensorSpec((B,), tf.int32)})
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(batches)))   # a known epoch: Keras does not warn
    return model.fit(ds, epochs=1, verbose=0, callbacks=list(cbs)).history


def test_stop_names_the_step():
    model = _build("stop")
    with pytest.raises(callbacks.NonFiniteLoss, match=r"epoch 1, step 2;.*train.on_nan=skip"):
        _fit(model, [_batch(0), _batch(1, bad=[3]), _batch(2)], [callbacks.StopOnNonFinite()])


def test_a_nan_the_fused_relu_hides_from_the_features_still_stops_training():
    """One NaN kernel entry: its channel's batch statistics are NaN, and where Grappler fuses that BatchNorm with its
    ReLU (the TF-graph step on oneDNN) the ReLU maps NaN to 0, so features and loss terms can stay finite; the
    gradients of the layer cannot, and the step's loss carries them."""
    model = _build("stop")
    conv = model.backbone.get_layer("s1b1_conv1")
    kernel = conv.kernel.numpy()
    kernel[0, 0, 0, 0] = np.nan
    conv.kernel.assign(kernel)
    with pytest.raises(callbacks.NonFiniteLoss, match=r"epoch 1, step 1"):
        _fit(model, [_batch(0), _batch(1)], [callbacks.StopOnNonFinite()])


@pytest.mark.parametrize("replicas", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_skip_leaves_every_variable_as_it_was(replicas, mirrored):
    strategy = mirrored if replicas == 2 else None
    model = _build("skip", strategy)
    _fit(model, [_batch(0)])
    before = _state(model)
    # one NaN row, on the second replica only when there are two: both replicas must skip
    history = _fit(model, [_batch(1, bad=[B - 1])])
    after = _state(model)
    assert history["skipped"] == [1.0]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.skipped.numpy()) == 1
    if replicas == 2:
        for values in mirrored.experimental_local_results(model.queue):
            np.testing.assert_array_equal(values.numpy(), before[[v.path for v in model.weights].index(
                model.queue.path)])
    # a finite step afterwards trains normally; mixed with a bad one, the epoch means count only finite steps
    logged = []
    history = _fit(model, [_batch(2), _batch(3, bad=[0])], [callbacks.StopOnNonFinite(skip=True, log=logged.append)])
    assert history["skipped"] == [1.0] and np.isfinite(history["loss"][0]) and "skipped 1 of 2 steps" in logged[0]
    changed = [not np.array_equal(a, b) for a, b in zip(after, _state(model))]
    assert sum(changed) > len(changed) // 2
    assert all(np.isfinite(w).all() for w in _state(model))


def test_skip_equals_training_without_the_bad_batch():
    good = [_batch(0), _batch(2)]
    a = _build("skip")
    b = _build("skip")
    b.set_weights(a.get_weights())
    _fit(a, [good[0], _batch(1, bad=[0, 5]), good[1]])
    _fit(b, good)
    for x, y in zip(_state(a)[:len(a.get_weights())], _state(b)[:len(b.get_weights())]):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_skip_stops_when_a_whole_epoch_is_skipped():
    model = _build("skip")
    with pytest.raises(callbacks.NonFiniteLoss, match="every step of epoch 1"):
        _fit(model, [_batch(1, bad=[0]), _batch(2, bad=[1])], [callbacks.StopOnNonFinite(skip=True, log=print)])
