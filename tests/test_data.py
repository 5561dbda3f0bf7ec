"""tfssl.data: every source (Fashion-MNIST idx files, image folder, numpy arrays / .npz, TFDS under mock_data),
the missing-data error, stratified label fractions and the train/eval pipelines. Nothing is downloaded."""
import math
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfssl import data, pipeline
from tfssl.config import DataConfig
from tfssl.data import DataError


def _elements(ds):
    return list(ds.as_numpy_iterator())


# ---------------------------------------------------------------------------------------------------- Fashion-MNIST

@pytest.fixture(scope="module")
def fmnist_arrays():
    return data.load_fashion_mnist_idx()


def test_fashion_mnist_idx_arrays(fmnist_arrays):
    x_tr, y_tr, x_te, y_te = fmnist_arrays
    assert x_tr.shape == (60000, 28, 28, 1) and x_te.shape == (10000, 28, 28, 1)
    assert x_tr.dtype == np.uint8 and x_te.dtype == np.uint8
    assert y_tr.shape == (60000,) and y_te.shape == (10000,) and y_tr.dtype == np.int32
    assert set(np.unique(y_tr)) == set(range(10)) and set(np.unique(y_te)) == set(range(10))
    assert np.all(np.bincount(y_tr) == 6000) and np.all(np.bincount(y_te) == 1000)
    assert x_tr.max() == 255 and x_tr.min() == 0
    # the mean the library normalises with is the data's
    assert abs(x_tr.mean() / 255.0 - data.STATS["fashion_mnist"][0][0]) < 0.002


def test_fashion_mnist_source_full():
    src = data.load_source(DataConfig())
    assert src.name == "fashion_mnist"
    assert (src.num_train, src.num_test, src.num_classes) == (60000, 10000, 10)
    assert int(src.train.cardinality()) == 60000 and int(src.test.cardinality()) == 10000
    assert src.mean == data.STATS["fashion_mnist"][0] and src.std == data.STATS["fashion_mnist"][1]
    spec = src.train.element_spec
    assert spec["image"].shape == (32, 32, 3) and spec["image"].dtype == tf.uint8
    assert spec["label"].dtype == tf.int32


def test_fashion_mnist_limit_and_resize(fmnist_arrays):
    x_tr, y_tr, x_te, y_te = fmnist_arrays
    src = data.load_source(DataConfig(path=data.FASHION_MNIST_DIR, limit=40, test_limit=15, image_size=32, channels=3))
    assert (src.num_train, src.num_test) == (40, 15)
    train, test = _elements(src.train), _elements(src.test)
    assert len(train) == 40 and len(test) == 15
    for e in train:
        assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8
        assert np.array_equal(e["image"][..., 0], e["image"][..., 1])      # gray replicated to RGB
        assert np.array_equal(e["image"][..., 0], e["image"][..., 2])
    assert [e["label"] for e in train] == list(y_tr[:40])                  # first N, in order
    assert [e["label"] for e in test] == list(y_te[:15])
    # the 32x32 image is the 28x28 idx image resized
    ref = tf.image.resize(tf.constant(x_tr[0], tf.float32), [32, 32], antialias=True).numpy()[..., 0]
    assert np.abs(train[0]["image"][..., 0].astype(float) - ref).max() <= 1.0
    assert not np.array_equal(train[0]["image"], train[1]["image"])


def test_fashion_mnist_native_size_is_exact(fmnist_arrays):
    x_tr = fmnist_arrays[0]
    src = data.load_source(DataConfig(limit=3, image_size=28, channels=1))
    imgs = np.stack([e["image"] for e in _elements(src.train)])
    assert imgs.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(imgs, x_tr[:3])


# ---------------------------------------------------------------------------------------------------- missing data

FIX = "apt-get install -y dataset-fashion-mnist"


def test_missing_fashion_mnist_dir_with_no_tfds_data(tmp_path):
    cfg = DataConfig(path=str(tmp_path / "nonexistent"), data_dir=str(tmp_path / "empty_tfds"))
    with pytest.raises(DataError) as e:
        data.load_source(cfg)
    msg = str(e.value)
    assert FIX in msg and str(tmp_path / "nonexistent") in msg and "data.path" in msg


@pytest.mark.parametrize("exc", [RuntimeError("no dataset here"), FileNotFoundError(), AssertionError()],
                         ids=["message", "FileNotFoundError()", "AssertionError()"])
def test_missing_fashion_mnist_dir_when_tfds_fails(tmp_path, monkeypatch, exc):
    """Whatever TFDS raises (``_tfds`` catches every Exception, some with an empty message) the user gets the
    DataError that says how to install the data."""
    import tensorflow_datasets as tfds

    def fail(*a, **k):
        raise exc
    monkeypatch.setattr(tfds, "builder", fail)
    with pytest.raises(DataError) as e:
        data.load_source(DataConfig(path=str(tmp_path / "nonexistent")))
    assert FIX in str(e.value)


def test_fashion_mnist_dir_without_files(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_source(DataConfig(path=str(tmp_path)))
    assert "train-images-idx3-ubyte" in str(e.value)


def test_unknown_source_name():
    with pytest.raises(DataError) as e:
        data.load_source(DataConfig(name="mnist"))
    assert "fashion_mnist, tfds:<name>, folder, numpy" in str(e.value)


# ---------------------------------------------------------------------------------------------------- image folder

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _img(path, color, size=(20, 24), mode="RGB"):
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    for i in range(3):
        _img(root / "cat" / f"c{i}.png", RED, size=(20 + i, 24))
    _img(root / "dog" / "d0.jpg", BLUE, size=(40, 40))
    _img(root / "dog" / "d1.JPEG", BLUE, size=(31, 17))
    _img(root / "dog" / "d2.png", 200, size=(16, 16), mode="L")            # grayscale file
    (root / "dog" / "broken.png").write_bytes(np.random.default_rng(0).integers(0, 256, 500, np.uint8).tobytes())
    (root / "dog" / "notes.txt").write_text("not an image")                 # ignored: not an image extension
    (root / "README.png.bak").write_text("ignored")
    return root


def test_folder_source_skips_corrupt(folder):
    src = data.load_source(DataConfig(name="folder", path=str(folder), image_size=32))
    assert src.name == "folder"
    assert src.skipped_corrupt == 1
    assert src.num_train == 6 and src.num_classes == 2 and src.test is None
    els = _elements(src.train)
    assert len(els) == 6
    labels = [int(e["label"]) for e in els]
    assert labels == [0, 0, 0, 1, 1, 1]                                      # sorted class folders → 0, 1
    for e in els:
        assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8
    for e in els[:3]:                                                        # red PNGs stay red after resizing
        np.testing.assert_array_equal(e["image"].reshape(-1, 3).min(0), RED)
        np.testing.assert_array_equal(e["image"].reshape(-1, 3).max(0), RED)
    for e in els[3:5]:                                                       # blue JPEGs (lossy: ±few)
        assert np.abs(e["image"].astype(int) - BLUE).max() <= 6
    np.testing.assert_array_equal(els[5]["image"], np.full((32, 32, 3), 200, np.uint8))


def test_folder_scan_reports_corrupt_path(folder):
    paths, labels, classes, corrupt = data.scan_folder(str(folder))
    assert classes == ["cat", "dog"]
    assert corrupt == [str(folder / "dog" / "broken.png")]
    assert len(paths) == 6 and list(labels) == [0, 0, 0, 1, 1, 1]
    assert not any(p.endswith(".txt") for p in paths)


def test_folder_corrupt_error_names_file(folder):
    with pytest.raises(DataError) as e:
        data.load_source(DataConfig(name="folder", path=str(folder), on_corrupt="error"))
    assert "broken.png" in str(e.value) and "on_corrupt=skip" in str(e.value)


def test_folder_empty_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        data.load_source(DataConfig(name="folder", path=str(tmp_path / "empty")))
    assert "no readable" in str(e.value)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(DataError):
        data.load_source(DataConfig(name="folder", path=str(only_bad)))


def test_folder_missing_or_unset_path(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_source(DataConfig(name="folder", path=str(tmp_path / "nope")))
    assert "not found" in str(e.value)
    with pytest.raises(DataError) as e:
        data.load_source(DataConfig(name="folder"))
    assert "data.path" in str(e.value)


def test_flat_folder_is_unlabelled(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(4):
        _img(root / f"{i}.png", (i * 60, 10, 10))
    src = data.load_source(DataConfig(name="folder", path=str(root), image_size=16, channels=1))
    assert src.num_train == 4 and src.num_classes == 0 and src.skipped_corrupt == 0
    els = _elements(src.train)
    assert [int(e["label"]) for e in els] == [-1] * 4
    assert all(e["image"].shape == (16, 16, 1) for e in els)


def test_folder_test_path_and_limit(folder, tmp_path):
    test_root = tmp_path / "held"
    (test_root / "cat").mkdir(parents=True)
    (test_root / "dog").mkdir()
    _img(test_root / "cat" / "a.png", RED)
    _img(test_root / "dog" / "b.png", BLUE)
    (test_root / "dog" / "c.png").write_bytes(b"not a png at all")
    src = data.load_source(DataConfig(name="folder", path=str(folder), test_path=str(test_root), limit=4))
    assert src.num_train == 4 and len(_elements(src.train)) == 4
    assert src.num_test == 2 and [int(e["label"]) for e in _elements(src.test)] == [0, 1]
    assert src.skipped_corrupt == 2


# ---------------------------------------------------------------------------------------------------- numpy

def test_from_numpy_uint8_and_float():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 16, 16), dtype=np.uint8)
    y = np.arange(10) % 4
    src = data.from_numpy(x, y, x[:3], y[:3], cfg=DataConfig(name="numpy", image_size=16, channels=1))
    assert (src.num_train, src.num_test, src.num_classes) == (10, 3, 4)
    els = _elements(src.train)
    np.testing.assert_array_equal(np.stack([e["image"] for e in els])[..., 0], x)
    assert [int(e["label"]) for e in els] == list(y)
    assert src.mean[0] == pytest.approx(x.mean() / 255.0) and src.std[0] == pytest.approx(x.std() / 255.0)
    # float images in [0,1] are scaled to uint8
    xf = x.astype(np.float32) / 255.0
    els = _elements(data.from_numpy(xf, None, cfg=DataConfig(image_size=16, channels=1)).train)
    np.testing.assert_array_equal(np.stack([e["image"] for e in els])[..., 0], x)
    assert [int(e["label"]) for e in els] == [-1] * 10


@pytest.mark.parametrize("size,channels", [(16, 1), (20, 3), (12, 1)])
def test_in_memory_images_are_prepared_once_as_each_read_would(size, channels, monkeypatch):
    """Arrays are resized to data.image_size/channels once at load (or kept when they already fit), and the training
    dataset and the random-access lookup give what preparing each image at each read gave."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (9, 16, 16, 1), dtype=np.uint8)
    cfg = DataConfig(name="numpy", image_size=size, channels=channels)
    per_image = np.stack([data._prepare(tf.constant(im), size, channels).numpy() for im in x])
    calls = []
    real = data._prepare
    monkeypatch.setattr(data, "_prepare", lambda *a: calls.append(1) or real(*a))
    src = data.from_numpy(x, np.arange(9), cfg=cfg)
    at_load = len(calls)
    assert at_load == (0 if (size, channels) == (16, 1) else 1)          # one batched call, none for the identity
    np.testing.assert_array_equal(np.stack([e["image"] for e in _elements(src.train)]), per_image)
    lookup = data.indexed(src)
    np.testing.assert_array_equal(lookup(tf.constant([4, 0, 8]))["image"].numpy(), per_image[[4, 0, 8]])
    assert len(calls) == at_load                                       # reads do not resize again
    if (size, channels) == (16, 1):
        np.testing.assert_array_equal(per_image, x)                    # the identity resize changed nothing


def test_in_memory_images_too_large_to_prepare_are_prepared_at_each_read():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (6, 10, 10, 1), dtype=np.uint8)
    assert data._prepared_array(x, 14, 3, max_bytes=6 * 14 * 14 * 3 - 1) is None
    assert data._prepared_array(x, 14, 3, max_bytes=6 * 14 * 14 * 3).shape == (6, 14, 14, 3)
    assert data._prepared_array(x, 10, 1, max_bytes=0) is x             # already prepared: nothing to hold
    import unittest.mock as mock
    with mock.patch.object(data, "_prepared_array", return_value=None):
        src = data.from_numpy(x, None, cfg=DataConfig(name="numpy", image_size=14, channels=3))
    per_image = np.stack([data._prepare(tf.constant(im), 14, 3).numpy() for im in x])
    np.testing.assert_array_equal(np.stack([e["image"] for e in _elements(src.train)]), per_image)
    np.testing.assert_array_equal(data.indexed(src)(tf.constant([5, 1]))["image"].numpy(), per_image[[5, 1]])


def test_from_numpy_rejects_bad_shape():
    with pytest.raises(DataError):
        data.from_numpy(np.zeros((4, 8, 8, 2), np.uint8), None)


def test_numpy_npz_source(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (12, 20, 20, 3), dtype=np.uint8)
    y = np.arange(12) % 3
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    src = data.load_source(DataConfig(name="numpy", path=str(path), limit=8, image_size=24))
    assert (src.num_train, src.num_test, src.num_classes) == (8, 5, 3)
    els = _elements(src.train)
    assert len(els) == 8 and els[0]["image"].shape == (24, 24, 3) and els[0]["image"].dtype == np.uint8
    assert [int(e["label"]) for e in els] == list(y[:8])
    ref = tf.cast(tf.round(tf.image.resize(x[0], [24, 24], antialias=True)), tf.uint8).numpy()
    assert np.abs(els[0]["image"].astype(int) - ref).max() <= 1


def test_numpy_npz_errors(tmp_path):
    with pytest.raises(DataError):
        data.load_source(DataConfig(name="numpy", path=str(tmp_path / "missing.npz")))
    path = tmp_path / "wrong.npz"
    np.savez(path, images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError) as e:
        data.load_source(DataConfig(name="numpy", path=str(path)))
    assert "x_train" in str(e.value) and "images" in str(e.value)


# ---------------------------------------------------------------------------------------------------- TFDS (mocked)

@pytest.fixture
def mock_mnist(tmp_path):
    """tfds.testing.mock_data with the MNIST metadata (splits train=12, test=5) written to a tmp data_dir: the mocked
    builder then knows its splits, as a prepared dataset does. Nothing is downloaded."""
    import tensorflow_datasets as tfds
    data_dir = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=12, data_dir=data_dir):
        builder = tfds.builder("mnist", data_dir=data_dir)
        builder.info.set_splits(tfds.core.SplitDict([
            tfds.core.SplitInfo(name="train", shard_lengths=[12], num_bytes=0, filename_template=None),
            tfds.core.SplitInfo(name="test", shard_lengths=[5], num_bytes=0, filename_template=None)]))
        os.makedirs(builder.data_dir, exist_ok=True)
        builder.info.write_to_directory(builder.data_dir)
        yield data_dir


def test_tfds_source(mock_mnist):
    src = data.load_source(DataConfig(name="tfds:mnist", data_dir=mock_mnist, image_size=32, channels=3))
    assert src.name == "mnist" and src.num_classes == 10
    assert (src.num_train, src.num_test) == (12, 5)
    els = _elements(src.train)
    assert len(els) == 12
    for e in els:
        assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8
        assert np.array_equal(e["image"][..., 0], e["image"][..., 2])
        assert 0 <= e["label"] < 10 and e["label"].dtype == np.int32
    assert src.test is not None and len(_elements(src.test)) > 0


def test_tfds_source_limit(mock_mnist):
    src = data.load_source(DataConfig(name="tfds:mnist", data_dir=mock_mnist, limit=4, test_limit=3, image_size=28,
                                      channels=1))
    assert (src.num_train, src.num_test) == (4, 3)
    els = _elements(src.train)
    assert len(els) == 4 and els[0]["image"].shape == (28, 28, 1)
    assert len(_elements(src.test)) == 3


def test_tfds_unknown_dataset_is_data_error(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_source(DataConfig(name="tfds:mnist", data_dir=str(tmp_path)))
    assert "tfds build mnist" in str(e.value)


# ---------------------------------------------------------------------------------------------------- label fraction

def _imbalanced_labels():
    rng = np.random.default_rng(3)
    labels = np.concatenate([np.full(100 * (c + 1), c) for c in range(5)])
    return rng.permutation(labels)


@pytest.mark.parametrize("fraction", [0.1, 0.01, 0.37, 1.0])
def test_label_fraction_is_stratified(fraction):
    labels = _imbalanced_labels()
    idx = data.label_fraction(labels, fraction, seed=0)
    assert np.all(np.diff(idx) > 0)                                          # sorted, no duplicates
    assert idx.min() >= 0 and idx.max() < len(labels)
    counts = np.bincount(labels[idx], minlength=5)
    for c in range(5):
        n_c = 100 * (c + 1)
        assert counts[c] == max(1, round(fraction * n_c))
        assert counts[c] >= 1


def test_label_fraction_on_fashion_mnist(fmnist_arrays):
    y = fmnist_arrays[1]
    idx = data.label_fraction(y, 0.01, seed=0)
    assert len(idx) == 600 and np.all(np.bincount(y[idx]) == 60)


def test_label_fraction_seed():
    labels = _imbalanced_labels()
    a = data.label_fraction(labels, 0.1, seed=0)
    b = data.label_fraction(labels, 0.1, seed=0)
    c = data.label_fraction(labels, 0.1, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == len(c) and not np.array_equal(a, c)


def test_label_fraction_bad_fraction():
    for f in (0, -0.1, 1.5):
        with pytest.raises(ValueError):
            data.label_fraction([0, 1, 2], f)


# ---------------------------------------------------------------------------------------------------- pipelines

def _indexed_source(n=50, size=8):
    """Images whose every pixel is the example index, label = index."""
    x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3)).copy()
    return data.from_numpy(x, np.arange(n), cfg=DataConfig(name="numpy", image_size=size))


def _labels(ds, batches):
    return [b["label"].tolist() for b in ds.take(batches).as_numpy_iterator()]


def test_train_pipeline_fixed_shape_batches():
    src = _indexed_source()
    one_pass = _elements(pipeline.train_pipeline(src.train, 16, seed=0, repeat=False))
    assert len(one_pass) == 3                                                # 50 // 16, remainder dropped
    assert all(b["image"].shape == (16, 8, 8, 3) and b["label"].shape == (16,) for b in one_pass)
    ds = pipeline.train_pipeline(src.train, 16, seed=0)
    spec = ds.element_spec
    assert spec["image"].shape == (16, 8, 8, 3)                              # static batch dim (drop_remainder)
    assert all(b["image"].shape == (16, 8, 8, 3) for b in ds.take(10).as_numpy_iterator())   # repeats
    for b in ds.take(3).as_numpy_iterator():                                 # image and label stay paired
        np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"])


def test_train_pipeline_shuffles_every_example_once_per_epoch():
    src = _indexed_source()
    batches = _elements(pipeline.train_pipeline(src.train, 10, seed=0, shuffle_buffer=100, repeat=False))
    seen = np.concatenate([b["label"] for b in batches])
    assert sorted(seen.tolist()) == list(range(50))
    assert seen.tolist() != list(range(50))


def test_train_pipeline_deterministic_with_seed():
    src = _indexed_source()
    a = _labels(pipeline.train_pipeline(src.train, 10, seed=7, shuffle_buffer=100), 12)
    b = _labels(pipeline.train_pipeline(src.train, 10, seed=7, shuffle_buffer=100), 12)
    c = _labels(pipeline.train_pipeline(src.train, 10, seed=8, shuffle_buffer=100), 12)
    assert a == b
    assert a != c
    assert a[:5] != a[5:10]                                                  # reshuffled each epoch


def test_train_pipeline_with_views():
    from tfssl.views import Views
    src = _indexed_source(size=32)
    views = Views(("strong", "weak"), "fashion_mnist", 24, small_crops=1, small_size=12)
    ds = pipeline.train_pipeline(src.train, 8, views=views, seed=0)
    b1, b2 = list(ds.take(2).as_numpy_iterator())
    assert set(b1) == {"views", "label"} and len(b1["views"]) == 3
    assert [v.shape for v in b1["views"]] == [(8, 24, 24, 3), (8, 24, 24, 3), (8, 12, 12, 3)]
    assert all(v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1 for v in b1["views"])
    # the weak view of a constant image is that constant: the views belong to the labelled images
    np.testing.assert_allclose(b1["views"][1][:, 5, 5, 0], b1["label"] / 255.0, atol=1e-5)
    a = _labels(pipeline.train_pipeline(src.train, 8, views=views, seed=3), 6)
    assert a == _labels(pipeline.train_pipeline(src.train, 8, views=views, seed=3), 6)


def test_eval_pipeline_floats_in_order():
    src = _indexed_source(n=50)
    batches = _elements(data.eval_pipeline(src.train, 16))
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]                   # last batch kept
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.dtype == np.float32 and x.shape == (50, 8, 8, 3)
    np.testing.assert_array_equal(y, np.arange(50))
    np.testing.assert_allclose(x[:, 0, 0, 0], np.arange(50) / 255.0, rtol=1e-6)


def test_eval_pipeline_range_on_fashion_mnist():
    src = data.load_source(DataConfig(limit=64, test_limit=64))
    x, y = next(iter(data.eval_pipeline(src.test, 64)))
    x = x.numpy()
    assert x.dtype == np.float32 and x.shape == (64, 32, 32, 3)
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9 and x.min() == 0.0


# ---------------------------------------------------------------------------- TFDS splits (STL-10, issue #21)

STL_SPLITS = {"train": 10, "test": 6, "unlabelled": 20}


@pytest.fixture
def mock_stl10(tmp_path):
    """STL-10 mocked with its real split names and per-split sizes (train 10, test 6, unlabelled 20; unlabelled
    images have label −1 as in TFDS): nothing is downloaded."""
    import tensorflow_datasets as tfds
    data_dir = str(tmp_path / "tfds")

    def as_dataset(self, split, **kw):
        parts = []
        for name in str(split).split("+"):
            n = STL_SPLITS[name.strip()]
            rng = np.random.default_rng(n)
            labels = np.full(n, -1, np.int64) if name.strip() == "unlabelled" else rng.integers(0, 10, n)
            parts.append(tf.data.Dataset.from_tensor_slices(
                {"image": rng.integers(0, 255, (n, 96, 96, 3)).astype("uint8"), "label": labels}))
        ds = parts[0]
        for p in parts[1:]:
            ds = ds.concatenate(p)
        return ds

    with tfds.testing.mock_data(as_dataset_fn=as_dataset, data_dir=data_dir):
        builder = tfds.builder("stl10", data_dir=data_dir)
        builder.info.set_splits(tfds.core.SplitDict([
            tfds.core.SplitInfo(name=k, shard_lengths=[v], num_bytes=0, filename_template=None)
            for k, v in STL_SPLITS.items()]))
        os.makedirs(builder.data_dir, exist_ok=True)
        builder.info.write_to_directory(builder.data_dir)
        yield data_dir


def test_stl10_pretrains_on_train_plus_unlabelled_and_evaluates_on_train(mock_stl10):
    from tfssl import config
    cfg = config.load("ressl_stl10", [f"data.data_dir={mock_stl10}"])
    src = data.load_source(cfg.data)
    assert (src.num_train, src.num_test, src.num_classes) == (30, 6, 10) and not src.originals
    pretraining, labelled = _elements(src.train), _elements(src.labelled)
    assert len(pretraining) == 30 and sum(e["label"] < 0 for e in pretraining) == 20
    assert len(labelled) == 10 and all(e["label"] >= 0 for e in labelled)
    assert pretraining[0]["image"].shape == (96, 96, 3)            # native 96 px: the 64-px views crop these
    plain = data.load_source(DataConfig(name="tfds:stl10", data_dir=mock_stl10, image_size=96))
    assert plain.num_train == 10 and plain.labelled is plain.train  # default: train only, as before
    with pytest.raises(DataError, match="unlabelled"):
        data.load_source(DataConfig(name="tfds:stl10", data_dir=mock_stl10, pretrain_split="train+unlabeled"))


# ------------------------------------------------------------------ crops of the originals (image folders, #21)

def _coordinate_image(h, w):
    """uint8 [h, w, 3]: channel 0 = column / (w − 1), channel 1 = row / (h − 1) (×255), channel 2 = 128."""
    x = np.broadcast_to(np.linspace(0, 255, w)[None, :], (h, w))
    y = np.broadcast_to(np.linspace(0, 255, h)[:, None], (h, w))
    return np.stack([x, y, np.full((h, w), 128.0)], -1).round().astype(np.uint8)


def _torchvision_boxes(h, w, n, scale, ratio=(3 / 4, 4 / 3), seed=0):
    """(box heights, widths) of n draws of torchvision's ``RandomResizedCrop.get_params`` on an h×w image, written
    out here from its algorithm: up to 10 tries of area U(scale)·h·w and log-uniform aspect, rounded, the first that
    fits; else the whole image cut to the nearest aspect in ``ratio``."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        for _ in range(10):
            area = h * w * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            bw, bh = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < bw <= w and 0 < bh <= h:
                out.append((bh, bw))
                break
        else:
            if w / h < ratio[0]:
                out.append((int(round(w / ratio[0])), w))
            elif w / h > ratio[1]:
                out.append((h, int(round(h * ratio[1]))))
            else:
                out.append((h, w))
    return np.array(out, np.float64).T


def test_folder_crops_follow_torchvision_random_resized_crop_on_the_originals(tmp_path):
    """An image folder of non-square images of different sizes: every view is a RandomResizedCrop of the decoded
    original. Over 2048 crops per image, the boxes (read off the coordinate channels of the crops) have the aspect
    and area statistics of torchvision's algorithm on that original, including its centre fallback on a very wide
    image, and not those of a crop of the image squashed to a square."""
    from tfssl import views as V
    sizes = [(90, 270), (240, 100), (160, 160), (30, 250)]          # (height, width); the last mostly falls back
    (tmp_path / "a").mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(_coordinate_image(h, w)).save(tmp_path / "a" / f"{i}.png")
    source = data.load_source(DataConfig(name="folder", path=str(tmp_path), image_size=32, channels=3))
    assert source.originals and source.num_train == len(sizes)
    n, scale, size = 2048, (0.2, 1.0), 16
    seeds = tf.stack([tf.zeros(n, tf.int64), tf.range(n, dtype=tf.int64)], 1)
    for index in range(len(sizes)):
        image = source.lookup_original(tf.constant(index, tf.int64))["image"]
        h, w = image.shape[0], image.shape[1]
        crop = lambda s: V.crop_original(image, size, scale, (3 / 4, 4 / 3), s)       # noqa: E731
        out = tf.function(lambda s: tf.map_fn(crop, s, fn_output_signature=tf.TensorSpec([size, size, 3],
                                                                                           tf.float32)))(seeds).numpy()
        assert out.min() >= 0 and out.max() <= 1
        # the box in pixels of the original, from the coordinate channels (centres of the first/last output pixels)
        width = (out[:, 0, -1, 0] - out[:, 0, 0, 0]) * (w - 1) * size / (size - 1)
        height = (out[:, -1, 0, 1] - out[:, 0, 0, 1]) * (h - 1) * size / (size - 1)
        ref_h, ref_w = _torchvision_boxes(h, w, n, scale)
        for name, got, want in (("log aspect", np.log(width / height), np.log(ref_w / ref_h)),
                                ("area fraction", width * height / (h * w), ref_w * ref_h / (h * w))):
            se = np.sqrt(got.var() / n + want.var() / n)
            assert abs(got.mean() - want.mean()) < 4 * se + 0.03, ((h, w), name, got.mean(), want.mean())
            assert abs(got.std() - want.std()) < 0.1 * want.std() + 0.03, ((h, w), name, got.std(), want.std())
        if w != h:           # a crop of the squashed square would have the image's aspect (in original pixels)
            assert abs(np.log(width / height).mean() - np.log(w / h)) > 0.4, (h, w)


def test_evaluation_view_is_the_centre_crop_of_the_short_side_resize(tmp_path):
    image = _coordinate_image(200, 300)                              # 300 wide, 200 high
    got = data.eval_view(tf.constant(image), 32, 28, 3).numpy()
    resized = tf.image.resize(image, (32, 48), antialias=True).numpy()    # short side 200 → 32, aspect kept
    want = np.clip(np.round(resized), 0, 255).astype(np.uint8)[2:30, 10:38]
    assert got.shape == (28, 28, 3)
    np.testing.assert_array_equal(got, want)
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(image).save(folder / "x.png")
    Image.fromarray(_coordinate_image(64, 40)).save(folder / "y.png")
    src = data.load_source(DataConfig(name="folder", path=str(tmp_path / "imgs"), image_size=32, crop_size=28))
    assert src.originals and src.lookup_original is not None
    first = _elements(src.train)[0]["image"]
    np.testing.assert_array_equal(first, want)                      # the protocols see the evaluation view
    assert tuple(src.lookup_original(tf.constant(1, tf.int64))["image"].shape) == (64, 40, 3)
    squashed = data.load_source(DataConfig(name="folder", path=str(tmp_path / "imgs"), image_size=32,
                                           originals=False))
    assert not squashed.originals and _elements(squashed.train)[0]["image"].shape == (32, 32, 3)


def _epochs(ds, epoch, first, count):
    """The batches of epochs first … first+count−1 of a per-epoch pipeline ``ds`` (one iterator each)."""
    out = []
    for e in range(first, first + count):
        epoch.assign(e)
        out += list(ds.as_numpy_iterator())
    return out


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["label"], y["label"])
        for u, v in zip(x["views"], y["views"]):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("kind", ["in_memory", "originals"])
def test_endless_epoch_pipeline_is_the_epochs_one_after_another(kind, tmp_path):
    """Pretraining opens one iterator for the whole run (``endless``, bench/NOTES.md §7m): from the epoch the host
    variable holds when the iterator starts, the same batches and views as one iterator per epoch; the variable is
    read once, so setting it per epoch (callbacks.EpochVariable) does not move the stream."""
    from tfssl.views import Views
    if kind == "originals":
        folder = tmp_path / "imgs" / "a"
        folder.mkdir(parents=True)
        for i, (h, w) in enumerate([(40, 90), (70, 50), (33, 33), (120, 60), (50, 50)] * 2):
            Image.fromarray(_coordinate_image(h, w)).save(folder / f"{i}.png")
        source = data.load_source(DataConfig(name="folder", path=str(tmp_path / "imgs"), image_size=24))
        views = Views(("strong", "weak"), "imagenet", 24)
    else:
        images = np.random.default_rng(0).integers(0, 255, (10, 24, 24, 1), np.uint8)
        source = data.from_numpy(images, np.arange(10) % 3)
        views = Views(("strong", "weak"), "fashion_mnist", 24)
    epoch = tf.Variable(0, dtype=tf.int64)
    per_epoch = pipeline.epoch_pipeline(source, 4, 3, epoch, views, seed=5)      # 12 images per epoch of 10
    endless = pipeline.epoch_pipeline(source, 4, 3, epoch, views, seed=5, endless=True)
    assert int(per_epoch.cardinality()) == 3 and int(endless.cardinality()) == tf.data.INFINITE_CARDINALITY
    for start in (0, 2):                                                       # a fresh run, a resumed one
        want = _epochs(per_epoch, epoch, start, 3)
        epoch.assign(start)
        stream = iter(endless)
        got = [next(stream)]
        epoch.assign(start + 7)                                                # read once: no effect now
        got += [next(stream) for _ in range(8)]
        _assert_same_batches(got, want)


def test_endless_epoch_pipeline_passes_the_training_step_to_scheduled_views():
    """Batch b of epoch e is step e·steps + b for a view schedule (WCL's warm-up) in the endless stream too: with
    constant images the warm-up (crop + flip) views stay constant for steps 0–6 and the later ones are jittered."""
    from tfssl.views import Views
    source = data.from_numpy(np.full((8, 24, 24, 1), 77, np.uint8), np.zeros(8, np.int64))
    views = Views(("strong", "strong"), "fashion_mnist", 24, warmup_recipes=("weak", "weak"), warmup_steps=7)
    epoch = tf.Variable(1, dtype=tf.int64)
    stream = iter(pipeline.epoch_pipeline(source, 4, 2, epoch, views, seed=1, endless=True))   # from step 2
    constant = [all(np.allclose(v, 77 / 255, atol=1e-6) for v in next(stream)["views"]) for _ in range(7)]
    assert constant == [True] * 5 + [False] * 2


def test_originals_pipeline_is_seeded_and_batches_fixed_size_views(tmp_path):
    from tfssl import views as V
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate([(40, 90), (70, 50), (33, 33), (120, 60)] * 2):
        Image.fromarray(_coordinate_image(h, w)).save(folder / f"{i}.png")
    src = data.load_source(DataConfig(name="folder", path=str(tmp_path / "imgs"), image_size=24))
    views = V.Views(("strong", "weak"), "imagenet", 24, small_crops=1, small_size=12)
    make = lambda: list(pipeline.epoch_pipeline(src, 4, 2, None, views, seed=3).take(2).as_numpy_iterator())  # noqa
    a, b = make(), make()
    assert [v.shape for v in a[0]["views"]] == [(4, 24, 24, 3), (4, 24, 24, 3), (4, 12, 12, 3)]
    for x, y in zip(a, b):                                         # the same batches and views again: exact resume
        for u, v in zip(x["views"], y["views"]):
            np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0]["views"][0], a[1]["views"][0])
    with pytest.raises(DataError, match="augment.on_device=false"):
        pipeline.epoch_pipeline(src, 4, 2, None, None, seed=3)
