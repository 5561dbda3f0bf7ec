"""Data sources and tf.data pipelines (METHODS.md, "Datasets and protocols").

Sources: Fashion-MNIST (upstream idx files, e.g. Debian's ``dataset-fashion-mnist``, else TFDS), any TFDS name, an
image folder (one sub-folder per class, or flat and unlabelled; label −1) and numpy arrays. A source yields
``{"image": uint8 [H,W,C], "label": int32}`` elements with ``data.channels``, of a fixed size:

* fixed-size sources (Fashion-MNIST, CIFAR, STL-10, numpy arrays) resize every image to ``data.image_size``; the
  views crop these (the papers' small-dataset pipelines do the same on the native images);
* sources whose images vary in size (image folders, ImageNet-like TFDS sets; ``data.originals: auto``) keep the
  decoded originals for pretraining — each view is a RandomResizedCrop of the *original* image, any size and aspect,
  resized to the view size (:func:`tfssl.views.crop_original`) — and their ``train``/``test`` datasets are the
  evaluation view: the short side resized to ``data.image_size``, then the ``data.crop_size`` centre crop
  (torchvision's Resize(256) + CenterCrop(224) at 256/224), as the papers' evaluation does.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
AUTOTUNE = tf.data.AUTOTUNE
# Per-dataset normalisation statistics of images in [0, 1] (used by the backbone's first layer).
STATS = {"fashion_mnist": ((0.286,) * 3, (0.353,) * 3), "cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
         "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class DataError(RuntimeError):
    """A dataset that cannot be read; the message names the fix."""


@dataclasses.dataclass
class Source:
    """A train split, a held-out split (may be None), and what is known about them."""
    train: tf.data.Dataset
    test: Optional[tf.data.Dataset]
    num_train: int
    num_test: int
    num_classes: int
    name: str
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    skipped_corrupt: int = 0
    lookup: Optional[Callable] = None   # random access to train: int64 index → {"image", "label"} (see indexed())
    originals: bool = False             # pretraining crops the originals: lookup_original / train_original
    lookup_original: Optional[Callable] = None   # index → {"image": uint8 [H, W, C] as decoded, "label"}
    train_original: Optional[tf.data.Dataset] = None   # the originals in order (sources without random access)
    eval_train: Optional[tf.data.Dataset] = None       # the labelled split of evaluation (default: train)

    @property
    def labelled(self):
        """The labelled training split the protocols use (kNN bank, linear probe, fine-tuning)."""
        return self.eval_train if self.eval_train is not None else self.train


def _read_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist_idx(directory=FASHION_MNIST_DIR):
    """(x_train [60000,28,28,1], y_train, x_test, y_test) from the upstream idx(.gz) files in ``directory``."""
    out = []
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            base = os.path.join(directory, f"{split}-{kind}-ubyte")
            path = base + ".gz" if os.path.exists(base + ".gz") else base
            if not os.path.exists(path):
                raise DataError(f"Fashion-MNIST file missing: {base}[.gz]")
            out.append(_read_idx(path))
    x_tr, y_tr, x_te, y_te = out
    return x_tr[..., None], y_tr.astype(np.int32), x_te[..., None], y_te.astype(np.int32)


def _channels(image, channels):
    if image.shape[-1] == 1 and channels == 3:
        return tf.image.grayscale_to_rgb(image)
    if image.shape[-1] == 3 and channels == 1:
        return tf.cast(tf.image.rgb_to_grayscale(image), tf.uint8)
    return image


def _prepare(image, size, channels):
    """uint8 image of any size/channels → uint8 [size,size,channels]."""
    image = tf.image.resize(_channels(image, channels), [size, size], antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def eval_view(image, short_side, crop, channels):
    """The evaluation view of an image of any size: the short side resized to ``short_side`` (aspect kept,
    antialiased), then the centre ``crop``×``crop`` (``crop`` None: ``short_side``). uint8 [crop, crop, channels]."""
    image = _channels(image, channels)
    crop = int(crop or short_side)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = float(short_side) / tf.reduce_min(hw)
    new = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), crop)
    image = tf.image.resize(image, new, antialias=True)
    top, left = (new[0] - crop) // 2, (new[1] - crop) // 2
    image = tf.image.crop_to_bounding_box(image, top, left, crop, crop)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    image.set_shape([crop, crop, channels])
    return image


def _originals(cfg, varying):
    """Whether pretraining crops the originals (``data.originals``; ``auto``: when image sizes vary)."""
    return bool(varying) if cfg.originals == "auto" else bool(cfg.originals)


def _from_arrays(x, y, cfg):
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"image array must be [N,H,W] or [N,H,W,1|3], got shape {x.shape}")
    if x.dtype != np.uint8:
        x = np.clip(np.round(x * 255.0 if x.max() <= 1.0 else x), 0, 255).astype(np.uint8)
    y = np.full([len(x)], -1, np.int32) if y is None else np.asarray(y, np.int32)
    prepared = _prepared_array(x, cfg.image_size, cfg.channels)
    if prepared is None:        # too large to hold prepared: each read resizes its image (as a TFDS source does)
        ds = tf.data.Dataset.from_tensor_slices({"image": x, "label": y})
        xt, yt = tf.constant(x), tf.constant(y)
        lookup = lambda i: {"image": _prepare(tf.gather(xt, i), cfg.image_size, cfg.channels),  # noqa: E731
                            "label": tf.gather(yt, i)}
        return ds.map(lambda e: {"image": _prepare(e["image"], cfg.image_size, cfg.channels), "label": e["label"]},
                      num_parallel_calls=AUTOTUNE), len(x), lookup
    xt, yt = tf.constant(prepared), tf.constant(y)
    lookup = lambda i: {"image": tf.gather(xt, i), "label": tf.gather(yt, i)}                    # noqa: E731
    return tf.data.Dataset.from_tensor_slices({"image": xt, "label": yt}), len(x), lookup


def _prepared_array(x, size, channels, max_bytes=2 ** 31, chunk=4096):
    """uint8 [N,H,W,C] → the prepared [N,size,size,channels] (:func:`_prepare`), computed once here rather than at
    every read of every epoch (a 28→28 antialiased resize per image cost as much CPU as the views, bench/NOTES.md
    §7o). ``x`` itself when it already has that shape (the resize would be the identity); None when the prepared
    array would take more than ``max_bytes``."""
    if tuple(x.shape[1:]) == (size, size, channels):
        return x
    if len(x) * size * size * channels > max_bytes:
        return None
    return np.concatenate([_prepare(tf.constant(x[i:i + chunk]), size, channels).numpy()
                           for i in range(0, len(x), chunk)] or [np.zeros((0, size, size, channels), np.uint8)])


def from_numpy(x_train, y_train, x_test=None, y_test=None, cfg=None, name="numpy", mean=None, std=None):
    """A :class:`Source` from arrays (uint8 0–255 or float 0–1; labels may be None = unlabelled)."""
    from tfssl.config import DataConfig
    cfg = cfg or DataConfig(name="numpy")
    if cfg.limit:
        x_train = x_train[:cfg.limit]
        y_train = None if y_train is None else y_train[:cfg.limit]
    if x_test is not None and cfg.test_limit:
        x_test, y_test = x_test[:cfg.test_limit], None if y_test is None else y_test[:cfg.test_limit]
    train, n, lookup = _from_arrays(x_train, y_train, cfg)
    test, n_test, _ = _from_arrays(x_test, y_test, cfg) if x_test is not None else (None, 0, None)
    labels = [l for l in (y_train, y_test) if l is not None]
    k = int(max(int(np.max(l)) for l in labels) + 1) if labels else 0
    mean = mean or (float(np.mean(x_train) / (255.0 if np.asarray(x_train).dtype == np.uint8 else 1.0)),) * 3
    std = std or (float(np.std(x_train) / (255.0 if np.asarray(x_train).dtype == np.uint8 else 1.0)),) * 3
    return Source(train, test, n, n_test, k, name, tuple(mean), tuple(std), lookup=lookup)


def _fashion_mnist(cfg):
    directory = cfg.path or FASHION_MNIST_DIR
    if os.path.isdir(directory):
        x_tr, y_tr, x_te, y_te = load_fashion_mnist_idx(directory)
        return from_numpy(x_tr, y_tr, x_te, y_te, cfg, "fashion_mnist", *STATS["fashion_mnist"])
    try:
        return _tfds("fashion_mnist", cfg)
    except DataError as e:
        raise DataError(f"Fashion-MNIST not found: no idx files in {directory} and TFDS failed ({e}). Fix: "
                        f"`apt-get install -y dataset-fashion-mnist` (as root), or set data.path=DIR holding "
                        f"train-images-idx3-ubyte.gz etc., or data.download=true with internet access") from None


def _split_size(splits, spec):
    """Examples in a TFDS split spec joined by ``+`` (e.g. STL-10's ``train+unlabelled``)."""
    return sum(splits[part.strip()].num_examples for part in spec.split("+"))


def _tfds(name, cfg):
    try:
        import tensorflow_datasets as tfds
        builder = tfds.builder(name, data_dir=cfg.data_dir)
        if cfg.download:
            builder.download_and_prepare()
        splits = builder.info.splits
        if not splits:                       # not prepared in data_dir
            raise FileNotFoundError(f"no prepared splits of {name}")
        test_split = cfg.test_split or ("test" if "test" in splits else ("validation" if "validation" in splits
                                                                          else None))
        for key, spec in (("pretrain_split", cfg.pretrain_split), ("eval_split", cfg.eval_split),
                          ("test_split", test_split)):
            if spec and any(part.strip() not in splits for part in spec.split("+")):
                raise DataError(f"data.{key}={spec!r}: {name} has the splits {', '.join(splits)}")
        train = builder.as_dataset(split=cfg.pretrain_split, shuffle_files=False)
        labelled = builder.as_dataset(split=cfg.eval_split, shuffle_files=False) \
            if cfg.eval_split != cfg.pretrain_split else None
        test = builder.as_dataset(split=test_split) if test_split else None
        n_train, n_test = _split_size(splits, cfg.pretrain_split), _split_size(splits, test_split) if test_split else 0
        image_shape = builder.info.features["image"].shape
    except DataError:
        raise
    except Exception as e:  # TFDS raises many types for a missing dataset
        raise DataError(f"TFDS dataset {name!r} is not available in data_dir={cfg.data_dir or '~/tensorflow_datasets'}"
                        f" ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}). Fix: prepare it with "
                        f"`tfds build {name}` on a machine with internet, or set data.download=true") from None
    if cfg.limit:
        train, n_train = train.take(cfg.limit), min(n_train, cfg.limit)
        labelled = labelled.take(cfg.limit) if labelled is not None else None
    if test is not None and cfg.test_limit:
        test, n_test = test.take(cfg.test_limit), min(n_test, cfg.test_limit)
    originals = _originals(cfg, None in tuple(image_shape)[:2])
    fixed = (lambda im: eval_view(im, cfg.image_size, cfg.crop_size, cfg.channels)) if originals else \
        (lambda im: _prepare(im, cfg.image_size, cfg.channels))
    label = lambda e: tf.cast(e.get("label", -1), tf.int32)                 # noqa: E731
    prep = lambda e: {"image": fixed(e["image"]), "label": label(e)}      # noqa: E731
    k = builder.info.features["label"].num_classes if "label" in builder.info.features else 0
    mean, std = STATS.get(name, IMAGENET_STATS)
    source = Source(train.map(prep, AUTOTUNE), test.map(prep, AUTOTUNE) if test is not None else None,
                    n_train, n_test, k, name, mean, std, originals=originals,
                    eval_train=labelled.map(prep, AUTOTUNE) if labelled is not None else None)
    if originals:
        source.train_original = train.map(lambda e: {"image": _channels(e["image"], cfg.channels), "label": label(e)},
                                          AUTOTUNE)
    return source


def scan_folder(root, on_corrupt="skip"):
    """(paths, labels, class_names, corrupt_paths) of an image folder; flat folders give label −1."""
    from PIL import Image
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}; set data.path to a folder of images "
                        f"(one sub-folder per class, or flat)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    entries = ([(os.path.join(root, c, f), i) for i, c in enumerate(classes)
                for f in sorted(os.listdir(os.path.join(root, c)))] if classes else
               [(os.path.join(root, f), -1) for f in sorted(os.listdir(root))])
    entries = [(p, l) for p, l in entries if p.lower().endswith(IMAGE_EXTENSIONS)]
    good, corrupt = [], []
    for path, label in entries:
        try:
            with Image.open(path) as im:
                im.load()
            good.append((path, label))
        except Exception as e:
            if on_corrupt == "error":
                raise DataError(f"corrupt image {path}: {e}; remove it or set data.on_corrupt=skip") from None
            corrupt.append(path)
    if not good:
        raise DataError(f"image folder {root} holds no readable {'/'.join(IMAGE_EXTENSIONS)} images")
    return [p for p, _ in good], np.array([l for _, l in good], np.int32), classes, corrupt


def _folder_split(root, cfg, limit, originals):
    paths, labels, classes, corrupt = scan_folder(root, cfg.on_corrupt)
    paths, labels = paths[:limit] if limit else paths, labels[:limit] if limit else labels

    def decode(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return _channels(image, cfg.channels)
    fixed = (lambda im: eval_view(im, cfg.image_size, cfg.crop_size, cfg.channels)) if originals else \
        (lambda im: _prepare(im, cfg.image_size, cfg.channels))
    ds = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        lambda p, l: {"image": fixed(decode(p)), "label": l}, AUTOTUNE).ignore_errors()
    pt, lt = tf.constant(paths or [""]), tf.constant(labels)
    lookup = lambda i: {"image": fixed(decode(tf.gather(pt, i))), "label": tf.gather(lt, i)}          # noqa: E731
    original = lambda i: {"image": decode(tf.gather(pt, i)), "label": tf.gather(lt, i)}               # noqa: E731
    return ds, len(paths), len(classes), len(corrupt), lookup, original


def _folder(cfg):
    if not cfg.path:
        raise DataError("data.name=folder needs data.path=DIR (one sub-folder per class, or flat)")
    originals = _originals(cfg, True)          # folders hold images of any size
    train, n, k, bad, lookup, original = _folder_split(cfg.path, cfg, cfg.limit, originals)
    test, n_test, bad_test = None, 0, 0
    if cfg.test_path:
        test, n_test, _, bad_test, _, _ = _folder_split(cfg.test_path, cfg, cfg.test_limit, originals)
    mean, std = IMAGENET_STATS
    return Source(train, test, n, n_test, k, "folder", mean, std, skipped_corrupt=bad + bad_test, lookup=lookup,
                  originals=originals, lookup_original=original if originals else None)


def _numpy_file(cfg):
    if not cfg.path or not os.path.isfile(cfg.path):
        raise DataError(f"data.name=numpy needs data.path=FILE.npz with x_train[, y_train, x_test, y_test]; "
                        f"got {cfg.path!r}")
    with np.load(cfg.path) as f:
        get = lambda k: f[k] if k in f else None
        if get("x_train") is None:
            raise DataError(f"{cfg.path} has no array 'x_train' (found: {', '.join(f.files)})")
        return from_numpy(get("x_train"), get("y_train"), get("x_test"), get("y_test"), cfg)


def load_source(cfg) -> Source:
    """The :class:`Source` named by ``cfg`` (a :class:`tfssl.config.DataConfig`)."""
    if cfg.name == "fashion_mnist":
        return _fashion_mnist(cfg)
    if cfg.name.startswith("tfds:"):
        return _tfds(cfg.name[5:], cfg)
    if cfg.name == "folder":
        return _folder(cfg)
    if cfg.name == "numpy":
        return _numpy_file(cfg)
    raise DataError(f"data.name={cfg.name!r} is not one of fashion_mnist, tfds:<name>, folder, numpy")


def indexed(source, max_bytes=2 ** 31):
    """Random access to ``source.train`` (index → {"image", "label"}), as CsMl's pairs need.

    In-memory arrays (Fashion-MNIST, numpy) and image folders have it; another source (TFDS) is read into memory
    once if its images take at most ``max_bytes``, else a :class:`DataError` says how to convert it.
    """
    if source.lookup is not None:
        return source.lookup
    spec = source.train.element_spec["image"]
    size = source.num_train * int(np.prod(spec.shape))
    if size > max_bytes:
        raise DataError(f"{source.name}: {source.num_train} training images ({size / 1e9:.1f} GB) are too many to "
                        f"hold in memory for random access (neighbour pairs); export them to an image folder "
                        f"and use data.name=folder")
    images, labels = [], []
    for batch in source.train.batch(4096):
        images.append(batch["image"].numpy())
        labels.append(batch["label"].numpy())
    xt, yt = tf.constant(np.concatenate(images)), tf.constant(np.concatenate(labels))
    source.lookup = lambda i: {"image": tf.gather(xt, i), "label": tf.gather(yt, i)}
    return source.lookup


def eval_pipeline(ds, batch_size):
    """Batched images in [0,1] with labels, in order, last batch kept."""
    return ds.map(lambda e: (tf.cast(e["image"], tf.float32) / 255.0, e["label"]), AUTOTUNE) \
        .batch(batch_size).prefetch(AUTOTUNE)


def label_fraction(labels, fraction, seed=0):
    """Sorted indices of a stratified subset: round(fraction·n_c) (≥1) images of every class c, seeded."""
    labels = np.asarray(labels)
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.permutation(idx)[:max(1, int(round(fraction * len(idx))))])
    return np.sort(np.concatenate(picked))
