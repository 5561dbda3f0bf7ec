"""WCL beyond the graph loss: the KNN multi-crop terms against a float64 numpy reference, the view warm-up schedule
(in the pipeline and on the device), the heads, and a short fit that logs the weak-label metrics."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from tfssl import data, losses, methods, pipeline
from tfssl.optim import SGD
from tfssl.views import Views


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ref_sup(q, keys, q_label, key_labels, tau):
    """−mean over positives of log softmax(q·keys/τ) (no self exclusion); 0 without positives."""
    logits = keys @ q / tau
    log_prob = logits - (np.log(np.sum(np.exp(logits - logits.max()))) + logits.max())
    pos = key_labels == q_label
    return -log_prob[pos].mean() if pos.any() else 0.0


def _ref_crop_terms(u, s, anchor, owner, z_all, h1, h2, l1, l2, keep, tau, tau_g):
    b, m, _ = u.shape
    big_b = h1.shape[0]
    terms, kept = np.zeros((b, m)), np.zeros((b, m))
    for i in range(b):
        score = s[i] @ anchor[i]
        for c in np.argsort(-score, kind="stable")[:keep]:
            kept[i, c] = 1.0
        for c in range(m):
            inst = _ref_sup(u[i, c], z_all, owner[i], np.concatenate([np.arange(big_b)] * 2), tau)
            graph = (_ref_sup(s[i, c], h1, l2[owner[i]], l2, tau_g) + _ref_sup(s[i, c], h2, l1[owner[i]], l1, tau_g))
            terms[i, c] = inst + graph / 2.0
    return terms.reshape(-1), kept.reshape(-1)


@pytest.mark.parametrize("b,m,keep,d,offset", [(4, 3, 2, 8, 0), (3, 6, 2, 5, 3), (5, 2, 2, 4, 5)])
def test_knn_crop_terms_match_reference(b, m, keep, d, offset):
    rng = np.random.default_rng(b * 10 + m)
    big_b = 2 * b + offset
    u, s = _unit(rng.standard_normal((b, m, d))), _unit(rng.standard_normal((b, m, d)))
    h1, h2 = _unit(rng.standard_normal((big_b, d))), _unit(rng.standard_normal((big_b, d)))
    z_all, anchor = _unit(rng.standard_normal((2 * big_b, d))), rng.standard_normal((b, d))
    l1, l2 = rng.integers(0, 3, big_b), rng.integers(0, 4, big_b)
    owner = np.arange(b) + offset
    terms, kept = losses.knn_crop_terms(*(tf.constant(x) for x in (u, s, anchor, owner, z_all, h1, h2, l1, l2)),
                                        keep, 0.2, 0.1)
    ref_terms, ref_kept = _ref_crop_terms(u, s, anchor, owner, z_all, h1, h2, l1, l2, keep, 0.2, 0.1)
    np.testing.assert_array_equal(kept.numpy(), ref_kept)
    np.testing.assert_allclose(terms.numpy(), ref_terms, rtol=1e-10)
    assert kept.numpy().reshape(b, m).sum(1).tolist() == [keep] * b


def test_knn_crop_selection_keeps_crops_nearest_to_the_image_and_passes_no_gradient_to_keys():
    rng = np.random.default_rng(0)
    d, big_b = 6, 4
    anchor = _unit(rng.standard_normal((2, d)))
    far = _unit(rng.standard_normal((2, d)) - 3 * anchor)
    s = np.stack([np.stack([far[i], anchor[i], _unit(anchor[i] + 0.3 * far[i]), far[i]]) for i in range(2)])
    u = _unit(rng.standard_normal((2, 4, d)))
    args = [tf.constant(x, tf.float64) for x in (u, s, anchor)]
    keys = [tf.constant(_unit(rng.standard_normal((n, d)))) for n in (2 * big_b, big_b, big_b)]
    labels = [tf.constant([0, 0, 1, 1])] * 2
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(args + keys)
        terms, kept = losses.knn_crop_terms(*args, tf.constant([0, 2]), *keys, *labels, 2)
        total = tf.reduce_sum(terms * kept)
    assert kept.numpy().reshape(2, 4).tolist() == [[0, 1, 1, 0]] * 2       # the two crops aligned with the image
    grads = tape.gradient(total, args + keys)
    assert grads[2] is None                                                 # anchor: selection only
    assert grads[4] is None and grads[5] is None                            # graph keys are stopped
    assert np.abs(grads[0].numpy()).max() > 0 and np.abs(grads[1].numpy()).max() > 0
    assert np.abs(grads[3].numpy()).max() > 0                               # instance candidates keep gradient
    assert np.all(grads[0].numpy()[:, [0, 3]] == 0)                         # dropped crops add nothing


def _constant_images(n=16, size=32, value=0.3):
    return tf.fill((n, size, size, 3), value)


def test_view_schedule_uses_warmup_recipe_before_switch():
    views = Views(("strong", "strong"), "fashion_mnist", 32, warmup_recipes=("weak", "weak"), warmup_steps=2)
    assert views.scheduled
    images = _constant_images()
    for step in (0, 1):   # weak = crop + flip: a constant image stays exactly constant
        for v in views(images, step=tf.constant(step)):
            np.testing.assert_allclose(v.numpy(), 0.3, atol=1e-6)
    for step in (2, 7, None):   # strong: brightness/contrast jitter (p 0.8) changes most of the 16 images
        changed = [np.abs(v.numpy() - 0.3).max(axis=(1, 2, 3)) > 1e-3 for v in views(images, step=step)]
        assert min(c.sum() for c in changed) >= 4
    with pytest.raises(ValueError, match="as many views"):
        Views(("strong", "strong"), warmup_recipes=("weak",), warmup_steps=3)


def test_pipeline_passes_the_training_step_to_scheduled_views():
    views = Views(("strong", "strong"), "fashion_mnist", 32, warmup_recipes=("weak", "weak"), warmup_steps=3)
    images = np.full((64, 32, 32, 3), 77, np.uint8)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": np.zeros(64, np.int64)})
    for start, warm_batches in ((0, 3), (2, 1)):
        batches = list(pipeline.train_pipeline(ds, 16, views, seed=0, shuffle_buffer=64, start_step=start).take(5))
        constant = [all(np.allclose(v.numpy(), 77 / 255, atol=1e-6) for v in b["views"]) for b in batches]
        assert constant == [True] * warm_batches + [False] * (5 - warm_batches)


def test_views_for_wcl_schedule_and_crops():
    cfg = tiny_config("wcl", view_warmup_epochs=2, knn_crops=3, knn_crop_size=16)
    views = methods.views_for(cfg, steps_per_epoch=5)
    assert views.scheduled and views.warmup_steps == 10 and views.count == 5
    assert [v.layers[0].size for v in views.small] == [16, 16, 16]
    assert not methods.views_for(cfg).scheduled                              # previews: main recipe only
    assert not methods.views_for(tiny_config("ressl"), steps_per_epoch=5).scheduled
    assert not methods.views_for(tiny_config("wcl", view_warmup_epochs=0), steps_per_epoch=5).scheduled


def test_on_device_views_follow_the_optimizer_step():
    cfg = tiny_config("wcl")
    views = Views(("strong", "strong"), "fashion_mnist", 32, warmup_recipes=("weak", "weak"), warmup_steps=4)
    model = methods.build(cfg, num_classes=10, total_steps=10, on_device_views=views)
    model.compile(SGD(0.01))
    batch = {"image": tf.cast(_constant_images() * 255, tf.uint8), "label": tf.zeros(16, tf.int32)}
    constant = lambda: all(np.allclose(v.numpy(), 0.3, atol=2e-3) for v in model._unpack(batch)[0])
    assert constant()
    model.optimizer.iterations.assign(4)
    assert not constant()


def test_wcl_heads_and_errors():
    cfg = tiny_config("wcl", graph_hidden=24, graph_dim=8)
    model = methods.build(cfg, num_classes=0)
    dense = lambda head: [l.units for l in head.layers if isinstance(l, keras.layers.Dense)]
    bns = lambda head: sum("batch" in type(l).__name__.lower() for l in head.layers)
    assert dense(model.projector) == [32, 32, 16] and bns(model.projector) == 2
    assert dense(model.graph_head) == [24, 24, 8] and bns(model.graph_head) == 2
    assert set(map(id, model.graph_head.trainable_variables)) <= set(map(id, model.student_variables))
    with pytest.raises(ValueError, match="knn_crops_keep"):
        methods.build(tiny_config("wcl", knn_crops=2, knn_crops_keep=3))


@pytest.mark.slow
def test_wcl_fit_logs_weak_label_metrics():
    keras.utils.set_random_seed(0)
    cfg = tiny_config("wcl", view_warmup_epochs=1, knn_crops=2, knn_crop_size=16, knn_crops_keep=1)
    views = methods.views_for(cfg, steps_per_epoch=2)
    model = methods.build(cfg, num_classes=10, total_steps=4, on_device_views=views)
    model.compile(SGD(0.05, momentum=0.9))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (64, 32, 32, 3)).astype("uint8")
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": rng.integers(0, 10, 64)}).batch(16)
    hist = model.fit(ds.repeat(), epochs=2, steps_per_epoch=2, verbose=0).history
    for key in ("loss", "instance_loss", "graph_loss", "weak_components", "weak_component_size", "weak_precision"):
        assert len(hist[key]) == 2 and np.all(np.isfinite(hist[key])), key
    assert all(1 <= c <= 8 for c in hist["weak_components"])                # ≤ B/2: every component has ≥ 2
    np.testing.assert_allclose(np.array(hist["weak_component_size"]) * hist["weak_components"], 16, rtol=0.3)
    assert all(0 <= p <= 1 for p in hist["weak_precision"])
    assert hist["loss"][0] > hist["instance_loss"][0] + hist["graph_loss"][0] - 1e-4   # + the crop loss
