"""Linear probe (METHODS.md "Evaluation protocols" → Linear): separable data, agreement with scikit-learn's logistic
regression on frozen random-init features, the stratified validation split, best-vs-last reporting, the augmented
(paper) path with a frozen backbone, and input errors."""
import json

import numpy as np
import pytest
import tensorflow as tf
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from tfssl import backbones, data
from tfssl.config import DataConfig
from tfssl.eval.knn import embed
from tfssl.eval.linear import PRESETS, _StepSchedule, augmented_linear_probe, linear_probe, split_validation
from tfssl.views import view

pytestmark = pytest.mark.xdist_group("linear_features")   # its module fixture is built once, in one process


def clusters(n, dim=32, k=10, seed=0):
    """k unit-variance Gaussian clusters around fixed centres ~34σ apart (separable with a wide margin); ``seed``
    draws the points, so different seeds give train and test sets of the same problem."""
    centres = np.random.default_rng(123).standard_normal((k, dim)) * 6.0
    y = np.arange(n) % k
    return (centres[y] + np.random.default_rng(seed).standard_normal((n, dim))).astype("float32"), y


def random_backbone(seed, channels=1, mean=(0.5,), std=(0.5,)):
    """The tiny ResNet with He-normal (fan-out) kernels drawn from a numpy seed.

    Drawn from numpy so the sklearn comparison sees the same features on every platform and Keras version.
    """
    model = backbones.build_backbone("tiny", channels=channels, mean=mean, std=std)
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if w.path.endswith("kernel"):
            kh, kw, _, out = w.shape
            w.assign(rng.normal(0.0, np.sqrt(2.0 / (kh * kw * out)), w.shape).astype("float32"))
    return model


# ------------------------------------------------------------------------------------------------- 1. separable

@pytest.mark.parametrize("preset", ["small", "moco", "simclr"])
def test_separable_clusters_reach_99_percent(preset):
    x, y = clusters(3000, seed=0)
    xt, yt = clusters(1000, seed=1)
    res = linear_probe(x, y, xt, yt, 10, preset, epochs=30 if preset != "small" else None)
    assert res["top1"] >= 0.99, res
    assert res["top5"] == 1.0 and res["train_top1"] >= 0.99
    assert res["settings"]["preset"] == preset and res["num_val"] == 300 and res["num_train"] == 2700


def test_presets_follow_the_papers():
    moco, simclr = PRESETS["moco"], PRESETS["simclr"]
    assert (moco["lr"], moco["epochs"], moco["schedule"], tuple(moco["milestones"]), moco["weight_decay"],
            moco["batch_size"], moco["nesterov"]) == (30.0, 100, "steps", (0.6, 0.8), 0.0, 256, False)
    assert (simclr["lr"], simclr["lr_scaling"], simclr["epochs"], simclr["schedule"], simclr["nesterov"]) == \
        (0.1, "linear", 90, "cosine", True)
    res = linear_probe(*clusters(600), None, None, 10, "moco", epochs=10, batch_size=64)
    s = res["settings"]
    assert s["learning_rate"] == 30.0 and s["milestones"] == [0.6, 0.8] and res["top1"] is None
    assert linear_probe(*clusters(600), None, None, 10, "simclr", epochs=2, batch_size=512)["settings"][
        "learning_rate"] == pytest.approx(0.2)
    json.dumps(res)                                                 # goes into summary.json as is


OFFICIAL = {   # preset: (lr after scaling, nesterov, wd, schedule, epochs, batch, crop scale) of the official code
    "ressl": (0.3, False, 0.0, "cosine", 100, 256, (0.08, 1.0)),          # ReSSL linear_eval.py:46-64
    "ressl_small": (0.2, True, 0.0, "cosine", 100, 256, (0.08, 1.0)),     # small-data linear_eval.py:50-101
    "wcl": (3.2, True, 0.0, "cosine", 80, 4096, (0.08, 1.0)),             # WCL linear_eval.py:41-62
    "moco": (30.0, False, 0.0, "steps", 100, 256, (0.08, 1.0)),           # MoCo / CsMl main_lincls.py:54-62
    "csml": (30.0, False, 0.0, "steps", 100, 256, (0.08, 1.0)),
}


@pytest.mark.parametrize("preset", list(OFFICIAL))
def test_paper_presets_have_the_official_settings_and_augmentation(preset, monkeypatch):
    from tfssl.eval import linear, protocols
    s = linear.settings(preset)
    assert (s["learning_rate"], s["nesterov"], s["weight_decay"], s["schedule"], s["epochs"], s["batch_size"],
            s["crop_scale"]) == OFFICIAL[preset]
    assert s["augment"] and not s["standardize"] and not PRESETS["small"]["augment"]
    if preset in ("moco", "csml"):
        assert tuple(s["milestones"]) == (0.6, 0.8)
    # run_linear takes the augmented path with the preset's crop (RandomResizedCrop 0.08–1 + flip)
    calls = {}

    def fake(backbone, train_ds, test_ds, num_classes, **kw):
        calls.update(kw)
        return {"top1": 0.0}
    monkeypatch.setattr(linear, "augmented_linear_probe", fake)
    subject = type("S", (), {"cfg": type("C", (), {"eval": type("E", (), dict(
        linear_preset=preset, linear_augment=None, epochs=None, val_fraction=0.1, seed=0, batch_size=8))(),
        "augment": type("A", (), dict(preset="cifar", size=32))()})(),
        "source": type("D", (), dict(labelled=tf.data.Dataset.from_tensors({"image": tf.zeros([32, 32, 3], tf.uint8),
                                                                              "label": 0}),
                                     test=None, num_classes=10))(),
        "keras_model": object(), "backbone": None, "origin": "x"})()
    subject.source.test = subject.source.labelled
    protocols.run_linear(subject)
    assert calls["preset"] == preset
    views = linear._settings(preset, {})
    assert views["crop_scale"] == (0.08, 1.0)


def test_augmented_probe_crops_with_the_preset_scale(monkeypatch):
    """The default view of the augmented probe is RandomResizedCrop with the preset's scale + flip."""
    import keras
    from tfssl import views as V
    seen, real = {}, V.view

    def spy(recipe, preset="cifar", size=32, scale=None, **kw):
        seen.update(recipe=recipe, scale=scale)
        return real(recipe, preset, size, scale=scale, **kw)
    monkeypatch.setattr(V, "view", spy)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten()])
    images = np.random.default_rng(0).uniform(0, 1, (20, 8, 8, 3)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(20) % 2)).batch(10)
    augmented_linear_probe(model, ds, None, 2, preset="ressl", epochs=1, batch_size=10)
    assert seen == {"recipe": "weak", "scale": (0.08, 1.0)}


def test_step_schedule_drops_by_ten_at_the_milestone_epochs():
    """100 epochs × 10 steps, milestones (0.6, 0.8): lr 30 through step 599, 3 from step 600 (first step of epoch
    61), 0.3 from step 800."""
    sched = _StepSchedule(30.0, [round(m * 100) * 10 for m in (0.6, 0.8)])
    got = [float(sched(step)) for step in (0, 599, 600, 799, 800, 999)]
    np.testing.assert_allclose(got, [30, 30, 3, 3, 0.3, 0.3], rtol=1e-6)


# ------------------------------------------------------------------------------- 2. agreement with scikit-learn

@pytest.fixture(scope="module")
def fashion_features():
    """Frozen features of a random-init tiny ResNet: 5000 Fashion-MNIST train / 2000 test images."""
    src = data.load_source(DataConfig(limit=5000, test_limit=2000, channels=1))
    model = random_backbone(0, mean=src.mean[:1], std=src.std[:1])
    x, y = embed(model, data.eval_pipeline(src.train, 500))
    xt, yt = embed(model, data.eval_pipeline(src.test, 500))
    return x, y, xt, yt


def test_probe_matches_logistic_regression_on_frozen_features(fashion_features):
    """The 'small' preset minimises mean CE + wd/2·‖W‖² on standardised features: LogisticRegression(C=1/(wd·n))."""
    x, y, xt, yt = fashion_features
    res = linear_probe(x, y, xt, yt, 10, "small", seed=0)
    train, _ = split_validation(y, 0.1, seed=0)                     # the rows the probe trained on
    mean, std = x[train].mean(0), x[train].std(0)
    c = 1.0 / (PRESETS["small"]["weight_decay"] * len(train))
    with threadpool_limits(1):                                      # BLAS threads thrash on a busy 2-CPU box
        ref = LogisticRegression(C=c, max_iter=2000).fit((x[train] - mean) / std, y[train])
    sk_top1 = ref.score((xt - mean) / std, yt)
    print(f"probe top-1 {res['top1']:.4f} vs LogisticRegression {sk_top1:.4f} (C={c:.3f})")
    assert 0.5 < sk_top1 < 0.95                                     # a real, non-trivial problem
    assert abs(res["top1"] - sk_top1) <= 0.01
    assert abs(res["train_top1"] - ref.score((x[train] - mean) / std, y[train])) <= 0.01


# -------------------------------------------------------------------------------------------- 3. validation split

def test_split_validation_is_stratified_disjoint_complete_and_seeded():
    rng = np.random.default_rng(0)
    labels = rng.choice(7, size=1234, p=[0.3, 0.2, 0.15, 0.15, 0.1, 0.07, 0.03])
    train, val = split_validation(labels, 0.1, seed=3)
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert len(val) == round(0.1 * len(labels))
    for c in range(7):
        n_c = np.sum(labels == c)
        assert abs(np.sum(labels[val] == c) - 0.1 * n_c) <= 1, c
    again = split_validation(labels, 0.1, seed=3)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(split_validation(labels, 0.1, seed=4)[1], val)
    assert len(split_validation(labels, 0.0)[1]) == 0
    assert np.sum(labels[split_validation(np.array([0, 0, 1]), 0.5)[1]] == 1) == 0  # a class keeps one train image


# --------------------------------------------------------------------------------------- 4. best vs last epoch

def test_best_val_epoch_is_chosen_on_validation_and_scored_on_test():
    """Overfitting setup (few noisy rows, many dims, no weight decay). The 'test' set IS the validation rows, so
    the best-validation head scored on test must reproduce the best validation accuracy exactly, and the last
    head the last one; nothing else could produce both numbers."""
    rng = np.random.default_rng(0)
    n, dim = 400, 256
    y = np.arange(n) % 4
    x = rng.standard_normal((n, dim)).astype("float32")
    x[:, :4] += 2.0 * np.eye(4, dtype="float32")[y]
    y_noisy = np.where(rng.random(n) < 0.3, rng.integers(0, 4, n), y)
    _, val = split_validation(y_noisy, 0.25, seed=5)
    kw = dict(epochs=40, lr=0.01, weight_decay=0.0, schedule="constant", val_fraction=0.25, seed=5)
    res = linear_probe(x, y_noisy, x[val], y_noisy[val], 4, "small", **kw)
    hist = res["val_top1"]
    assert len(hist) == 40 and res["best_val_epoch"] == int(np.argmax(hist)) + 1
    assert res["best_val_top1"] == max(hist)
    assert max(hist) > hist[-1] + 0.02                              # validation really picked an earlier epoch
    assert res["test_top1_at_best_val"] == pytest.approx(max(hist))
    assert res["top1"] == pytest.approx(hist[-1])
    again = linear_probe(x, y_noisy, x[val], y_noisy[val], 4, "small", **kw)
    assert again["val_top1"] == hist and again["train_loss"] == res["train_loss"]   # deterministic given the seed


# ------------------------------------------------------------------------------------- 5. augmented, frozen BN

def test_augmented_probe_keeps_backbone_frozen_and_learns():
    x, y, xt, yt = data.load_fashion_mnist_idx()
    model = random_backbone(1)
    rng = np.random.default_rng(0)
    for w in model.weights:                                         # non-trivial BN statistics to guard
        if "moving_mean" in w.path:
            w.assign(rng.normal(0.0, 0.01, w.shape).astype("float32"))
        elif "moving_variance" in w.path:
            w.assign(rng.uniform(0.5, 2.0, w.shape).astype("float32"))
    before = [w.numpy().copy() for w in model.weights]
    to_ds = lambda a, b: tf.data.Dataset.from_tensor_slices((a.astype("float32") / 255.0, b)).batch(100)
    seen, crop_flip = [], view("weak", "fashion_mnist", 28)

    def views(images):
        seen.append(images.shape)
        return crop_flip(images)
    res = augmented_linear_probe(model, to_ds(x[:600], y[:600]), to_ds(xt[:300], yt[:300]), 10, views=views,
                                 epochs=3, batch_size=64)
    after = model.weights
    assert len(after) == len(before)
    for w, b in zip(after, before):
        np.testing.assert_array_equal(w.numpy(), b, err_msg=w.path)
    assert seen, "the views were never applied"
    assert res["top1"] > 0.3 and res["train_top1"] > 0.3           # chance is 0.1
    assert res["num_train"] == 540 and res["num_val"] == 60 and res["num_test"] == 300
    assert res["settings"]["augmented"] and len(res["val_top1"]) == 3


def test_augmented_probe_default_view_and_no_test():
    x, y, _, _ = data.load_fashion_mnist_idx()
    ds = tf.data.Dataset.from_tensor_slices((x[:200].astype("float32") / 255.0, y[:200])).batch(50)
    model = random_backbone(2)
    res = augmented_linear_probe(model, ds, None, 10, epochs=1)
    assert res["top1"] is None and res["test_top1_at_best_val"] is None and res["best_val_epoch"] == 1
    shuffled = ds.unbatch().shuffle(200, seed=1, reshuffle_each_iteration=True).batch(50)
    with pytest.raises(tf.errors.InvalidArgumentError, match="different order than on the first pass"):
        augmented_linear_probe(model, shuffled, None, 10, epochs=1)


# -------------------------------------------------------------------------------------------------- 6. errors

def test_bad_inputs_raise_one_clear_value_error():
    x, y = clusters(100)
    with pytest.raises(ValueError, match="differ in length: 100 features, 99 labels"):
        linear_probe(x, y[:99], x, y, 10)
    with pytest.raises(ValueError, match=r"test features and labels differ in length"):
        linear_probe(x, y, x[:50], y, 10)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*\[10\]"):
        linear_probe(x, np.where(y == 0, 10, y), x, y, 10)
    with pytest.raises(ValueError, match=r"test labels must be in \[0, 10\).*\[-1\]"):
        linear_probe(x, y, x, np.where(y == 3, -1, y), 10)
    with pytest.raises(ValueError, match="unknown linear-probe preset 'byol'; valid: ressl, ressl_small, wcl, moco, simclr, small"):
        linear_probe(x, y, x, y, 10, "byol")
    with pytest.raises(ValueError, match="unknown linear-probe schedule"):
        linear_probe(x, y, x, y, 10, schedule="poly")
    with pytest.raises(ValueError, match="32 dimensions but test features 16"):
        linear_probe(x, y, x[:, :16], y, 10)
    with pytest.raises(ValueError, match="NaN or inf"):
        linear_probe(np.where(x > 5, np.nan, x), y, x, y, 10)
    with pytest.raises(ValueError, match="validation fraction"):
        split_validation(y, 1.0)
