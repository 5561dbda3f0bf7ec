"""The model zoo: a JSON manifest of exported backbones (``export/zoo.json``), hash verification and a loader.

An entry is the model card of a ``tfssl export`` directory (method, backbone, dataset, evaluation, input spec,
files with sizes and SHA-256) plus ``location``: where the exported directory lives (a path relative to the
manifest, an absolute path or a URL). The small Fashion-MNIST backbones, one per method (≈ 1 MB per format), are
committed under ``export/models/`` and load offline by name; larger exports are listed with their ``location`` only.

    tfssl zoo add runs/wcl_fmnist/export --name wcl_tiny_fmnist       # add (or --replace) an entry
    tfssl zoo verify ~/Downloads/backbone.onnx                        # a file: found by its hash
    tfssl zoo verify path/to/export --name wcl_tiny_fmnist            # a directory: every file of the entry
    layer = tfssl.zoo.load("ressl_fashion_mnist")                     # Keras model, trainable, for fine-tuning
    tfssl.zoo.path("ressl_fashion_mnist")                             # its verified directory (SavedModel, ONNX)
"""
from __future__ import annotations

import json
import os

from tfssl.export import sha256_file

MANIFEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "export", "zoo.json")
CARD_FIELDS = ("training", "evaluation", "input", "output", "formats", "onnx_opset", "parity", "versions", "files")


class ZooError(ValueError):
    """A manifest, entry or file that cannot be used; the message names the problem and the fix."""


def read_manifest(manifest=MANIFEST):
    """The manifest dict ``{"format_version": 1, "models": {name: entry}}`` (empty if the file does not exist)."""
    if not os.path.exists(manifest):
        return {"format_version": 1, "models": {}}
    try:
        with open(manifest) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ZooError(f"cannot read the zoo manifest {manifest}: {e}; restore it from git") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ZooError(f"{manifest} is not a tfssl zoo manifest (no 'models' mapping); restore it from git")
    return data


def _write_manifest(data, manifest):
    tmp = manifest + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, manifest)


def _card(export_dir):
    path = os.path.join(export_dir, "model_card.json")
    if not os.path.isfile(path):
        raise ZooError(f"{export_dir} has no model_card.json; pass a directory written by `tfssl export`")
    with open(path) as f:
        return json.load(f)


def _check_files(root, files):
    """Names of files under ``root`` that are missing or whose size/SHA-256 differ from ``files``."""
    bad = []
    for rel, meta in sorted(files.items()):
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            bad.append(f"{rel} (missing)")
        elif os.path.getsize(path) != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            bad.append(f"{rel} (sha256 differs)")
    return bad


def add(export_dir, name, manifest=MANIFEST, location=None, replace=False):
    """Add the export in ``export_dir`` as entry ``name``; its files must match their card. Returns the entry.

    ``location`` defaults to ``export_dir`` relative to the manifest's folder.
    """
    card = _card(export_dir)
    bad = _check_files(export_dir, card.get("files", {}))
    if bad:
        raise ZooError(f"{export_dir} does not match its model card: {', '.join(bad[:5])}; export it again")
    data = read_manifest(manifest)
    if name in data["models"] and not replace:
        raise ZooError(f"zoo entry {name!r} already exists in {manifest}; pass --replace or choose another --name")
    where = location or os.path.relpath(os.path.abspath(export_dir), os.path.dirname(os.path.abspath(manifest)))
    entry = {"name": name, "location": where, **{k: card.get(k) for k in CARD_FIELDS}}
    data["models"][name] = entry
    _write_manifest(data, manifest)
    return entry


def entry(name, manifest=MANIFEST):
    """The manifest entry ``name`` (ZooError listing the known names otherwise)."""
    models = read_manifest(manifest)["models"]
    if name not in models:
        raise ZooError(f"no zoo entry {name!r} in {manifest}; known: {', '.join(sorted(models)) or 'none'}")
    return models[name]


def verify(path, name=None, manifest=MANIFEST):
    """Check a downloaded file or export directory against the manifest; returns the matching entry name.

    A file is matched by its SHA-256 against every entry's files (or only ``name``'s); a directory must hold every
    file of entry ``name`` (or of the entry its model_card.json names) with the recorded size and hash.
    """
    models = read_manifest(manifest)["models"]
    if os.path.isdir(path):
        name = name or _card(path).get("name")
        bad = _check_files(path, entry(name, manifest)["files"])
        if bad:
            raise ZooError(f"{path} does not match zoo entry {name!r}: {', '.join(bad[:5])}; download it again")
        return name
    if not os.path.isfile(path):
        raise ZooError(f"{path} does not exist; pass a downloaded file or export directory")
    digest = sha256_file(path)
    candidates = {name: entry(name, manifest)} if name else models
    for model_name, e in candidates.items():
        if any(meta["sha256"] == digest for meta in e.get("files", {}).values()):
            return model_name
    raise ZooError(f"{path} (sha256 {digest[:16]}…) matches no file of "
                   f"{'zoo entry ' + repr(name) if name else 'any zoo entry'}; the download is corrupt or not ours")


def path(name_or_path, manifest=MANIFEST):
    """The local directory of a zoo backbone, every file checked against the manifest (size and SHA-256): for the
    SavedModel (``path(name) + "/saved_model"``, e.g. ``keras.layers.TFSMLayer``) or the ONNX file. An export
    directory is returned as it is. The ``<method>_fashion_mnist`` backbones ship in this repository
    (``export/models/``), so this works offline on a fresh clone; ZooError for an entry whose files live elsewhere."""
    return _resolve(name_or_path, manifest)


def _resolve(name_or_path, manifest):
    if os.path.isdir(name_or_path):
        return name_or_path
    e = entry(name_or_path, manifest)
    where = e["location"]
    if "://" in where:
        raise ZooError(f"zoo entry {name_or_path!r} lives at {where}; download it, `tfssl zoo verify` it, and "
                       f"load the local directory")
    root = where if os.path.isabs(where) else os.path.join(os.path.dirname(os.path.abspath(manifest)), where)
    if not os.path.isdir(root):
        raise ZooError(f"zoo entry {name_or_path!r}: directory {root} not found; export or download it there")
    bad = _check_files(root, e["files"])
    if bad:
        raise ZooError(f"zoo entry {name_or_path!r} at {root} does not match the manifest: {', '.join(bad[:5])}")
    return root


def check_parity(name_or_path, manifest=MANIFEST, rtol=1e-4):
    """Run every format of a zoo backbone (``.keras``, SavedModel ``serve`` / ``serving_default``, ONNX) on the
    export's recorded parity images and compare with the features recorded at export time; returns {format: max
    relative error}; ZooError above ``rtol`` (a corrupt or mismatched download)."""
    import numpy as np
    root = _resolve(name_or_path, manifest)
    path = os.path.join(root, "parity.npz")
    if not os.path.isfile(path):
        raise ZooError(f"{root} has no parity.npz (exported before tfssl recorded parity images); export it again")
    with np.load(path) as f:
        images, want = f["images"], f["features"]
    x = images.astype(np.float32) / 255.0
    runs = {}
    if os.path.isfile(os.path.join(root, "backbone.keras")):
        runs["keras"] = lambda: load(root)(x, training=False)
    if os.path.isdir(os.path.join(root, "saved_model")):
        import tensorflow as tf
        sm = tf.saved_model.load(os.path.join(root, "saved_model"))
        runs["savedmodel_serve"] = lambda: sm.serve(tf.constant(x))
        runs["savedmodel_uint8"] = lambda: sm.signatures["serving_default"](images=tf.constant(images))["features"]
    if os.path.isfile(os.path.join(root, "backbone.onnx")):
        import onnxruntime as ort
        session = ort.InferenceSession(os.path.join(root, "backbone.onnx"), providers=["CPUExecutionProvider"])
        runs["onnx"] = lambda: session.run(["features"], {"images": x})[0]
    errors = {}
    for fmt, run in runs.items():
        got = np.asarray(run(), np.float64)
        errors[fmt] = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))
        if not errors[fmt] <= rtol:
            raise ZooError(f"{root}: the {fmt} backbone's features differ from the recorded ones by {errors[fmt]:.1e} "
                           f"(relative); the files are corrupt or of another export")
    return errors


def load(name_or_path, trainable=True, manifest=MANIFEST):
    """A zoo backbone as a Keras model (a layer): float images [N, H, W, C] in [0, 1] → pooled features.

    ``name_or_path``: a manifest entry name or an export directory. Loads ``backbone.keras`` (stock layers only);
    with ``trainable=False`` it is frozen (use ``training=False`` to keep BatchNorm statistics fixed too).
    """
    import keras
    root = _resolve(name_or_path, manifest)
    path = os.path.join(root, "backbone.keras")
    if not os.path.isfile(path):
        raise ZooError(f"{root} has no backbone.keras; export with --formats including keras")
    model = keras.saving.load_model(path)
    model.trainable = trainable
    return model
