"""Frozen features for the evaluation protocols: from a run's checkpoint or an exported backbone, cached on disk.

:func:`load_backbone` opens what ``tfssl export`` writes — an export directory, ``backbone.keras``, a SavedModel
directory or ``backbone.onnx`` — as a callable from float32 images in [0, 1] (NHWC) to pooled features, so every
protocol evaluates exported files exactly like checkpoints. :func:`cached_embed` stores features per (checkpoint,
split) in ``.npz`` files written via temp + rename and keyed by the weights' SHA-256, so repeated evaluations of the
same checkpoint embed once.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from tfssl.eval.knn import embed


class _OnnxBackbone:
    """ONNX Runtime session as a callable: float32 images → features (numpy)."""

    def __init__(self, path):
        import onnxruntime as ort
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images, training=False):
        return self.session.run(None, {self.input: np.asarray(images, np.float32)})[0]


class _SavedModelBackbone:
    """A tfssl SavedModel (``serve_float`` signature) as a callable: float32 images → features."""

    def __init__(self, path):
        import tensorflow as tf
        self.obj = tf.saved_model.load(path)
        if "serve_float" not in self.obj.signatures:
            raise ValueError(f"{path} has no 'serve_float' signature; pass a SavedModel written by `tfssl export`")
        self.fn = self.obj.signatures["serve_float"]

    def __call__(self, images, training=False):
        import tensorflow as tf
        return self.fn(images=tf.convert_to_tensor(images, tf.float32))["features"]


def load_backbone(path):
    """Open an exported backbone (export dir, .keras, SavedModel dir or .onnx) as images-in-[0,1] → features."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "backbone.keras")):
        path = os.path.join(path, "backbone.keras")
    elif os.path.isdir(path) and os.path.isdir(os.path.join(path, "saved_model")):
        path = os.path.join(path, "saved_model")
    if path.endswith(".keras") and os.path.isfile(path):
        import keras
        return keras.saving.load_model(path)
    if path.endswith(".onnx") and os.path.isfile(path):
        return _OnnxBackbone(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return _SavedModelBackbone(path)
    raise ValueError(f"--backbone {path}: not an export directory, .keras, .onnx or SavedModel directory; pass "
                     f"what `tfssl export` wrote")


def embed_any(backbone, dataset):
    """:func:`tfssl.eval.knn.embed` for Keras models; a plain batch loop for other callables (ONNX, SavedModel)."""
    import keras
    if isinstance(backbone, keras.Model):
        return embed(backbone, dataset)
    feats, labels = [], []
    for images, y in dataset:
        feats.append(np.asarray(backbone(np.asarray(images))))
        labels.append(np.asarray(y))
    return np.concatenate(feats).astype("float32"), np.concatenate(labels)


def file_sha256(path):
    """SHA-256 of a file (or of every file under a directory, in sorted order)."""
    digest = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cached_embed(backbone, dataset, cache_dir, key):
    """(features, labels) of ``dataset``, read from ``cache_dir/<key>.npz`` if present, else computed and stored.

    ``key`` must identify the weights and the split (e.g. ``f"{sha256[:16]}-test-5000"``).
    """
    path = os.path.join(cache_dir, f"{key}.npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            return f["features"], f["labels"]
    features, labels = embed_any(backbone, dataset)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, features=features, labels=labels)
    os.replace(tmp, path)
    return features, labels
