"""CsMl: the pair pipeline (neighbour draws, CutMix λ′), the cross-sample phase switch, what is enqueued, the stage-3
level (variables, EMA, checkpoints), configuration errors and a short pretraining run with two minings."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from tfssl import config, data, methods, pipeline
from tfssl.cutmix import cutmix
from tfssl.optim import SGD

B = 8


def _model(**params):
    cfg = tiny_config("csml", queue_size=32, **params)
    model = methods.build(cfg, num_classes=10, total_steps=20, steps_per_epoch=10)
    model.compile(SGD(0.1, momentum=0.9), probe_optimizer=SGD(0.1))
    return cfg, model


def _views(seed=0):
    rng = np.random.default_rng(seed)
    views = tuple(rng.uniform(0, 1, (B, 32, 32, 3)).astype("float32") for _ in range(5))
    return views + (np.full(B, 0.6, "float32"),)


def _indexed_source(n=40):
    """Image i is the constant i (so a view's pixels tell which image it came from); label i mod 4."""
    x = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 1), np.uint8)
    return data.from_numpy(x, np.arange(n) % 4, cfg=config.DataConfig(name="numpy", image_size=8))


def _identity(images, **_):
    x = tf.cast(images, tf.float32)
    return x, x


def _ids(view):
    return np.round(view.numpy()[:, 0, 0, 0]).astype(int)


def test_pair_pipeline_draws_neighbours_from_the_current_table():
    source = _indexed_source()
    table = tf.Variable(np.tile(np.arange(40, dtype=np.int32)[:, None], (1, 3)))
    it = iter(pipeline.pair_pipeline(source, table, _identity, B, cutmix, seed=3))
    for _ in range(5):                                   # before the first mining: every image is its own neighbour
        b = next(it)
        np.testing.assert_array_equal(_ids(b["views"][0]), _ids(b["views"][2]))
        np.testing.assert_array_equal(b["label"].numpy(), _ids(b["views"][0]) % 4)
    rows = np.stack([(np.arange(40) + d) % 40 for d in (1, 2, 3)], axis=1).astype(np.int32)
    table.assign(rows)
    seen = set()
    for _ in range(40):                                  # prefetched batches may still hold the old table
        b = next(it)
    for _ in range(30):
        b = next(it)
        anchor, neighbour = _ids(b["views"][0]), _ids(b["views"][2])
        for a, j in zip(anchor, neighbour):
            assert j in rows[a]
            seen.add((j - a) % 40)
        np.testing.assert_array_equal(_ids(b["views"][1]), anchor)          # k_i: the anchor, k_j: the neighbour
        np.testing.assert_array_equal(_ids(b["views"][3]), neighbour)
    assert seen == {1, 2, 3}                             # every one of the k neighbours gets drawn


def test_pair_pipeline_mix_lambda_is_the_anchor_pixel_fraction_and_seeded():
    source = _indexed_source()
    table = tf.Variable(np.stack([(np.arange(40) + 1) % 40] * 2, axis=1).astype(np.int32))
    batches = [b for b, _ in zip(pipeline.pair_pipeline(source, table, _identity, B, cutmix, seed=5), range(6))]
    again = [b for b, _ in zip(pipeline.pair_pipeline(source, table, _identity, B, cutmix, seed=5), range(6))]
    lams = set()
    for b, c in zip(batches, again):
        qi, qj, qm, lam = (b["views"][i].numpy() for i in (0, 2, 4, 5))
        assert np.all(lam == lam[0]) and 0 <= lam[0] <= 1                   # one box and λ′ per batch
        kept = np.mean(qm == qi, axis=(1, 2, 3))          # anchor and neighbour differ in every pixel
        np.testing.assert_allclose(kept, lam, atol=1e-6)
        assert np.all((qm == qi) | (qm == qj))
        lams.add(float(lam[0]))
        for u, v in zip(b["views"], c["views"]):
            np.testing.assert_array_equal(u.numpy(), v.numpy())
    assert len(lams) > 1                                  # a new box every batch


def test_pair_pipeline_epoch_batches_are_the_streams_at_their_steps():
    """Epoch e's batch b is step e·steps + b (its element indices tell it): the same pairs, CutMix box and λ′ as
    the endless stream's batch at that step, so a resumed CsMl run draws what an uninterrupted one did."""
    source = _indexed_source()
    table = tf.Variable(np.stack([(np.arange(40) + d) % 40 for d in (1, 2, 3)], axis=1).astype(np.int32))
    stream = [b for b, _ in zip(pipeline.pair_pipeline(source, table, _identity, B, cutmix, seed=5), range(6))]
    epoch = tf.Variable(2, dtype=tf.int64)
    per_epoch = list(pipeline.pair_pipeline(source, table, _identity, B, cutmix, seed=5, steps=2, epoch=epoch))
    assert len(per_epoch) == 2
    for got, want in zip(per_epoch, stream[4:6]):
        for u, v in zip(got["views"], want["views"]):
            np.testing.assert_array_equal(u.numpy(), v.numpy())
    for b, batch in enumerate(per_epoch):                 # the box of step 2·2 + b, drawn here independently
        qi, _, qj = batch["views"][:3]
        mixed, lam = cutmix(qi, qj, tf.constant([5, 4 + b], tf.int64))
        np.testing.assert_array_equal(batch["views"][4].numpy(), mixed.numpy())
        np.testing.assert_allclose(batch["views"][5].numpy(), float(lam))


def test_pair_pipeline_errors_and_in_memory_random_access():
    source = _indexed_source(40)
    with pytest.raises(data.DataError, match="40 training images"):
        pipeline.pair_pipeline(source, tf.Variable(np.zeros((39, 2), np.int32)), _identity, B, cutmix)
    source.lookup = None                                  # e.g. TFDS: read into memory once when small
    lookup = data.indexed(source)
    assert int(np.round(lookup(tf.constant(7, tf.int64))["image"].numpy()[0, 0, 0])) == 7
    source.lookup = None
    with pytest.raises(data.DataError, match="data.name=folder"):
        data.indexed(source, max_bytes=100)


def test_cross_sample_phase_switch_and_only_anchor_keys_enqueued():
    _, model = _model(cross_warmup_epochs=1)             # 10 steps per epoch → cross-sample pairs from step 10
    views = _views()
    model.optimizer.iterations.assign(9)
    _, out, _ = model.loss_and_gradients(views)
    assert float(out["cross_weight"]) == 0.0
    model.optimizer.iterations.assign(10)
    loss, out, grads = model.loss_and_gradients(views)
    assert float(out["cross_weight"]) == 0.5 and float(out["mix_lambda"]) == pytest.approx(0.6)
    assert np.isfinite(float(loss)) and all(g is not None for g in grads)
    model.train_step({"views": views, "label": tf.zeros(B, tf.int32)})
    keys = model.teacher_outputs(views)                  # teacher unchanged after its EMA at the step's start
    np.testing.assert_allclose(model.queue.numpy()[:B], keys["ki"][4].numpy(), atol=1e-6)
    assert int(model.queue_ptr.numpy()) == B
    assert np.abs(model.queue.numpy()[:B] - keys["kj"][4].numpy()).max() > 1e-2


def test_stage3_level_has_its_own_head_queue_and_ema(tmp_path):
    _, single = _model()
    _, multi = _model(levels=[3, 4])
    extra = len(multi.student_variables) - len(single.student_variables)
    assert extra == len(multi.stage3_head.trainable_variables) + len(multi.stage3_projector.trainable_variables) > 0
    assert len(multi.teacher_pairs) - len(single.teacher_pairs) == extra
    out = multi.train_step({"views": _views(), "label": tf.zeros(B, tf.int32)})
    assert float(out["level3_loss"]) > 0 and float(out["level4_loss"]) > 0
    assert int(multi.queue3_ptr.numpy()) == B and single.train_step({"views": _views(), "label": tf.zeros(B)})[
        "level3_loss"] == 0
    path = str(tmp_path / "w.weights.h5")
    multi.save_weights(path)
    _, again = _model(levels=[3, 4])
    again.load_weights(path)
    for a, b in zip(multi.weights, again.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    x = _views()[0]
    np.testing.assert_allclose(again.backbone(x), multi.backbone(x), atol=1e-6)
    assert again.backbone.outputs[0].shape[-1] == 64       # the exported backbone stays the pooled features


def test_configuration_errors():
    with pytest.raises(config.ConfigError, match="levels"):
        _model(levels=[2, 4])


def test_on_device_pairs_come_raw_from_the_pipeline_and_are_viewed_and_mixed_on_the_device():
    """augment.on_device: the pair pipeline yields raw anchors and neighbours; the step makes their (q, k) views and
    the CutMix of the q-views (one box per global batch) — the six views of the pipeline path, same shapes."""
    cfg, model = _model()
    cfg.augment.on_device = True
    batch = next(iter(model.make_pipeline(_indexed_source(), None, cfg, 4, None)))
    assert set(batch) == {"anchor", "neighbour", "label"} and batch["anchor"].dtype == tf.uint8
    np.testing.assert_array_equal(batch["anchor"].numpy(), batch["neighbour"].numpy())   # table: itself at start
    model.views = methods.views_for(cfg)
    seed = tf.constant([1, 2], tf.int64)
    qi, ki, qj, kj, qm, lam = model.device_views(batch, tf.constant(0, tf.int64), seed, seed)
    assert all(v.shape == qi.shape and v.dtype == tf.float32 for v in (ki, qj, kj, qm))
    assert lam.shape == (qi.shape[0],) and 0 < float(lam[0]) <= 1 and len(set(lam.numpy().tolist())) == 1
    assert not np.allclose(qi.numpy(), qj.numpy())        # the neighbour's views are drawn on their own stream
    mixed = qm.numpy()
    kept = np.isclose(mixed, qi.numpy()).all(axis=(0, 3))    # the pasted box is the same for every image
    assert 0 < kept.mean() <= 1 and abs(kept.mean() - float(lam[0])) < 1e-6


@pytest.mark.slow
def test_short_run_mines_every_epoch_and_records_agreement(tmp_path):
    from tfssl.train import pretrain
    cfg = config.load("csml_fashion_mnist", ["data.limit=256", "data.test_limit=128", "train.epochs=2",
                                             "train.batch_size=64", "train.verbose=0", "train.jit_compile=false",
                                             "model.projector_hidden=64", "method.queue_size=256",
                                             "eval.knn_train_limit=256", "model.backbone=tiny"])
    summary = pretrain(cfg, str(tmp_path), log=lambda *_: None)
    assert np.isfinite(summary["final_loss"]) and summary["history"]["cross_weight"] == [0.0, 0.5]
    minings = json.load(open(os.path.join(tmp_path, "summary.json")))["neighbour_label_agreement"]
    assert [m["epoch"] for m in minings] == [0, 1] and all(0 <= m["agreement"] <= 1 for m in minings)
    assert all(m["num_images"] == 256 for m in minings)
