"""Semi-supervised fine-tuning: stratified seeded label subsets, all layers train on a copy, and a separable task is
learnt from a small labelled fraction."""
import numpy as np
import pytest
import tensorflow as tf

from tfssl.backbones import build_backbone
from tfssl.eval.semi import finetune, labelled_subset
from tfssl.views import view


def _dataset(n=400, size=16, seed=0):
    """Noise images; classes 0-2 brighten colour channel c, class 3 none: invariant to the crop + flip views."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 100, (n, size, size, 3)).astype("uint8")
    for i, c in enumerate(labels):
        if c < 3:
            images[i, :, :, c] += 120
    return images, labels


def test_labelled_subset_is_stratified_and_seeded():
    images, labels = _dataset(400)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    x1, y1 = labelled_subset(ds, 0.1, seed=3)
    x2, y2 = labelled_subset(ds, 0.1, seed=3)
    x3, _ = labelled_subset(ds, 0.1, seed=4)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    for c in range(4):
        assert abs(np.sum(y1 == c) - round(0.1 * np.sum(labels == c))) <= 1


def test_finetune_learns_and_trains_a_copy():
    images, labels = _dataset(480)
    backbone = build_backbone("tiny", cifar_stem=True)
    before = [w.copy() for w in backbone.get_weights()]
    test = tf.data.Dataset.from_tensor_slices((images[400:].astype("float32") / 255.0, labels[400:])).batch(40)
    res = finetune(backbone, images[:80], labels[:80], test, 4, augment=view("weak", "cifar", 16), epochs=15,
                   batch_size=16, head_lr=0.1, seed=0)
    assert res["top1"] >= 0.9 and res["top5"] == 1.0 and res["labelled"] == 80
    assert res["backbone_lr"] == pytest.approx(0.01)
    for w, b in zip(backbone.get_weights(), before):    # the original backbone is untouched
        np.testing.assert_array_equal(w, b)
    with pytest.raises(ValueError, match="as many labels"):
        finetune(backbone, images[:5], labels[:4], test, 4)


def test_prediction_entropy_matches_numpy():
    from tfssl.eval.semi import prediction_entropy
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=20)
    p[0] = [1, 0, 0, 0, 0]                               # 0·log 0 = 0
    expected = np.array([-sum(x * np.log(x) for x in row if x > 0) for row in p])
    np.testing.assert_allclose(prediction_entropy(p), expected, rtol=1e-12)
    assert prediction_entropy(p)[0] == 0 and prediction_entropy(np.full((1, 4), 0.25))[0] == pytest.approx(np.log(4))


@pytest.mark.slow
def test_pseudo_label_round_filters_by_entropy():
    from tfssl.eval.semi import pseudo_label_finetune
    images, labels = _dataset(400)
    ds = tf.data.Dataset.from_tensor_slices({"image": images[:320], "label": labels[:320]})
    test = tf.data.Dataset.from_tensor_slices((images[320:].astype("float32") / 255.0, labels[320:])).batch(40)
    x, y = labelled_subset(ds, 0.25, seed=1)
    kw = dict(epochs=4, batch_size=32, head_lr=0.1, seed=0)
    backbone = build_backbone("tiny", cifar_stem=True)
    none = pseudo_label_finetune(backbone, x, y, ds, test, 4, 0.25, entropy=0.0, **kw)
    assert none["pseudo_labelled"] == 0 and none["unlabelled"] == 320 - len(y) and none["pseudo_accuracy"] is None
    assert none["labelled"] == len(y)                    # round 2 saw the labelled images only
    every = pseudo_label_finetune(backbone, x, y, ds, test, 4, 0.25, entropy=np.log(4) + 1e-6, **kw)
    assert every["pseudo_labelled"] == every["unlabelled"] and every["labelled"] == 320
    assert every["first_round"]["top1"] == none["first_round"]["top1"]     # same seed, same first round
    assert every["pseudo_accuracy"] > 0.5                # the separable task: most pseudo-labels are right
