"""Model-zoo export of a pretrained backbone: SavedModel, ONNX and ``.keras``, verified for parity, with a model card.

:func:`export_backbone` builds everything in a temp directory beside ``out_dir`` and renames it at the end, so a
failure (bad target, converter error, parity above 1e-4) leaves nothing behind. ``out_dir`` holds:

* ``saved_model/``: signatures ``serving_default`` (uint8 images [N, H, W, C] in 0..255) and ``serve_float``
  (float32 in [0, 1]) → ``{"features": [N, D]}``; ``serve`` (float32 in [0, 1] → features [N, D]), the endpoint
  Keras 3's ``TFSMLayer(path)`` calls by default, and ``serve_train``, its training mode (BatchNorm on batch
  statistics, moving statistics updated: ``TFSMLayer(path, call_training_endpoint="serve_train",
  trainable=True)`` fine-tunes like the ``.keras`` backbone); for reuse (TF Hub's Reusable SavedModel API, e.g.
  ``hub.KerasLayer(path, trainable=True)``) ``obj(images, training=…)`` on float images with ``obj.variables`` /
  ``trainable_variables`` / ``regularization_losses``; ``features`` / ``features_train`` are aliases of
  ``serve`` / ``serve_train``.
* ``backbone.onnx`` (tf2onnx): ``images`` float32 [batch, height, width, C] in [0, 1] → ``features``.
* ``backbone.keras``: stock Keras layers only, loads with ``keras.saving.load_model(path)``.
* ``model_card.json`` and ``README.md``: summary.json facts, input spec, parity, sizes and SHA-256 of every file;
  ``parity.npz``: the real sample images of the parity check (uint8) and the Keras backbone's features of them, so
  that a downloaded (or shipped) export can be checked against what it computed when it was made.

N, H and W are free everywhere; normalisation (dataset mean/std) is the backbone's first layer, so inputs are raw.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfssl import __version__
from tfssl.backbones import ChunkedGradConv2D, FusedBatchNormalization

FORMATS = ("savedmodel", "onnx", "keras")
ONNX_OPSET = 17
PARITY_RTOL = 1e-4          # export fails above this relative error (max |Δ| / max |reference|)
TRAINING_KEYS = ("method", "backbone", "width", "dataset", "epochs", "steps", "batch_size", "num_train", "replicas",
                 "strategy", "final_loss", "recipe_sha256", "checkpoint", "checkpoint_sha256")
EVAL_KEYS = ("knn_top1", "knn_top5", "probe_top1", "knn", "linear", "semi")


class ExportError(ValueError):
    """An export that cannot be done (target, checkpoint, parity); the message names the fix."""


def plain_backbone(backbone):
    """A copy of ``backbone`` made of stock Keras layers only (tfssl's BatchNorm and Conv2D classes → Keras's).

    Same config and weights, so inference-mode outputs are identical; every layer computes in float32 (a mixed
    precision policy is not exported); multi-output backbones keep only the pooled output.
    """
    def swap(layer):
        cls = (keras.layers.BatchNormalization if isinstance(layer, FusedBatchNormalization)
               else keras.layers.Conv2D if isinstance(layer, ChunkedGradConv2D) else type(layer))
        return cls.from_config({**layer.get_config(), "dtype": "float32"})

    plain = keras.models.clone_model(backbone, clone_function=swap)
    plain.set_weights(backbone.get_weights())
    if len(plain.outputs) > 1:
        plain = keras.Model(plain.inputs[0], plain.outputs[0], name=plain.name)
    custom = sorted({type(l).__name__ for l in plain.layers if not type(l).__module__.startswith("keras.")})
    if custom:
        raise ExportError(f"backbone has non-Keras layers {', '.join(custom)}; they would need custom_objects")
    return plain


class _Reusable(tf.Module):
    """The SavedModel root: the plain backbone's functions and variables (no Keras objects are saved)."""

    variables = trainable_variables = regularization_losses = None   # plain attributes, saved with the object

    def __init__(self, model, channels):
        super().__init__(name="tfssl_backbone")
        self.variables = [v.value for v in model.variables]
        self.trainable_variables = [v.value for v in model.trainable_variables]
        self.regularization_losses = []
        f32, u8 = (tf.TensorSpec([None, None, None, channels], d, name="images") for d in (tf.float32, tf.uint8))
        self.features = tf.function(lambda images: model(images, training=False), input_signature=[f32])
        self.features_train = tf.function(lambda images: model(images, training=True), input_signature=[f32])
        self.serve, self.serve_train = self.features, self.features_train      # Keras 3 TFSMLayer's names
        self.serve_float = tf.function(lambda images: {"features": self.features(images)}, input_signature=[f32])
        self.serve_uint8 = tf.function(
            lambda images: {"features": self.features(tf.cast(images, tf.float32) / 255.0)}, input_signature=[u8])
        for training in (False, True):
            self.__call__.get_concrete_function(f32, training=training)

    @tf.function
    def __call__(self, images, training=False):
        return (self.features_train if training else self.features)(images)


def _save_onnx(plain, path, channels, opset):
    import onnx, tf2onnx  # noqa: E401
    spec = (tf.TensorSpec([None, None, None, channels], tf.float32, name="images"),)
    proto, _ = tf2onnx.convert.from_keras(plain, input_signature=spec, opset=opset)
    graph, old = proto.graph, proto.graph.output[0].name
    for node in graph.node:                     # name the output "features", like the SavedModel signatures
        node.output[:] = ["features" if o == old else o for o in node.output]
        node.input[:] = ["features" if i == old else i for i in node.input]
    graph.output[0].name = "features"
    for dim, name in zip(graph.input[0].type.tensor_type.shape.dim, ("batch", "height", "width")):
        dim.dim_param = name
    graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def _images(input_size, channels, sample_images):
    """uint8 parity batches: random images at ``input_size`` and at an odd size (padding), then the samples."""
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, s, s, channels), dtype=np.uint8)
               for n, s in ((8, input_size), (3, input_size + 7))]
    if sample_images is not None:
        x = np.asarray(sample_images)
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[-1] != channels or not len(x):
            raise ExportError(f"sample_images must be [N, H, W, {channels}] images, got shape {x.shape}")
        batches.append(x if x.dtype == np.uint8 else np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))
    return batches


def _parity(backbone, plain, tmp, formats, batches):
    """Max abs / relative (max |Δ| / max |reference|) error of every format against ``backbone`` in inference mode."""
    runs = {"keras_plain": lambda u8, x: plain(x, training=False)}
    if "keras" in formats:
        reloaded = keras.saving.load_model(os.path.join(tmp, "backbone.keras"))
        runs["keras"] = lambda u8, x: reloaded(x, training=False)
    if "savedmodel" in formats:
        sm = tf.saved_model.load(os.path.join(tmp, "saved_model"))
        runs["savedmodel_uint8"] = lambda u8, x: sm.signatures["serving_default"](images=tf.constant(u8))["features"]
        runs["savedmodel_float"] = lambda u8, x: sm.signatures["serve_float"](images=tf.constant(x))["features"]
        runs["savedmodel_call"] = lambda u8, x: sm(tf.constant(x), training=False)
    if "onnx" in formats:
        import onnxruntime as ort
        session = ort.InferenceSession(os.path.join(tmp, "backbone.onnx"), providers=["CPUExecutionProvider"])
        runs["onnx"] = lambda u8, x: session.run(["features"], {"images": x})[0]
    errors = {name: {"max_abs": 0.0, "max_rel": 0.0} for name in runs}
    for u8 in batches:
        x = u8.astype(np.float32) / 255.0
        ref = backbone(x, training=False)
        ref = np.asarray(ref[0] if isinstance(ref, (list, tuple)) else ref, np.float64)
        for name, run in runs.items():
            diff = float(np.max(np.abs(np.asarray(run(u8, x), np.float64) - ref)))
            errors[name]["max_abs"] = max(errors[name]["max_abs"], diff)
            errors[name]["max_rel"] = max(errors[name]["max_rel"], diff / max(float(np.max(np.abs(ref))), 1e-12))
    return errors


def _first_line(error):
    """The informative line of an exception (Keras puts it after an 'Example error message…' header)."""
    lines = [s.strip() for s in str(error).splitlines() if s.strip()] or [type(error).__name__]
    return (lines[1] if "Example error" in lines[0] and len(lines) > 1 else lines[0])[:300]


def sha256_file(path):
    """SHA-256 hex digest of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root):
    """{relative path: {bytes, sha256}} of every file under ``root``."""
    out = {}
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    return out


def _versions():
    import onnx, onnxruntime, tf2onnx  # noqa: E401
    return {"tfssl": __version__, "tensorflow": tf.__version__, "keras": keras.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "tf2onnx": tf2onnx.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _width(width):
    """`` at width 0.5`` for a width multiplier other than 1 (none recorded: the README says nothing)."""
    return f" at width {width:g}" if width not in (None, 1) else ""


def _readme(card):
    t, files, evaluation = card["training"], card["files"], json.dumps(card["evaluation"])
    return "\n".join([
        f"# {card['name']}: {t['method']} {t['backbone']}{_width(t.get('width'))} backbone, "
        f"{card['output']['features'][1]}-d features", "",
        f"Pretrained with tfssl on {t['dataset']} for {t['epochs']} epochs; evaluation: {evaluation}", "",
        "Inputs (normalisation is inside every format):",
        *[f"- {k}: {v}" for k, v in card["input"]["endpoints"].items()],
        "", "| file | bytes | sha256 |", "|---|---|---|",
        *[f"| `{p}` | {files[p]['bytes']} | `{files[p]['sha256']}` |" for p in files if "/" not in p],
        "", "Parity against the Keras backbone (max |Δ|, max |Δ| / max |features|):",
        *[f"- {k}: {v['max_abs']:.1e}, {v['max_rel']:.1e}" for k, v in card["parity"].items()],
        "", "All hashes (saved_model/ too) are in model_card.json. Use:", "```python",
        "import keras, tensorflow as tf, onnxruntime",
        'features = keras.saving.load_model("backbone.keras")(float_images)          # Keras 3: fine-tune it too',
        'features = keras.layers.TFSMLayer("saved_model")(float_images)              # the `serve` endpoint',
        'tunable = keras.layers.TFSMLayer("saved_model", call_training_endpoint="serve_train", trainable=True)',
        'features = tf.saved_model.load("saved_model").signatures["serving_default"](images=uint8_images)["features"]',
        'features = onnxruntime.InferenceSession("backbone.onnx").run(["features"], {"images": float_images})[0]',
        "```", ""])


def _target(out_dir, overwrite):
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"export target {out_dir} exists and is not a directory; choose another --out")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ExportError(f"export target {out_dir} exists and is not empty; pass --overwrite (overwrite=True) "
                              f"to replace it, or choose another --out")
        if not os.path.isfile(os.path.join(out_dir, "model_card.json")):
            raise ExportError(f"export target {out_dir} is not a tfssl export (no model_card.json) and --overwrite "
                              f"only replaces earlier exports; empty it yourself or choose another --out")
    return out_dir


def _make_temp(out_dir):
    """(temp dir beside ``out_dir``, first parent directory this call created or None)."""
    parent, created = os.path.dirname(out_dir), None
    probe = parent
    while not os.path.lexists(probe):
        created, probe = probe, os.path.dirname(probe)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)                                   # mkdtemp's 0700 would stick to out_dir
        return tmp, created
    except OSError as e:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise ExportError(f"cannot write the export to {out_dir}: {e.strerror or e} ({e.filename or parent}); "
                          f"choose a writable --out") from None


def _publish(tmp, out_dir):
    backup = tmp + ".old"
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        os.replace(out_dir, backup)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if os.path.isdir(backup):
            os.replace(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def export_backbone(backbone, out_dir, formats=FORMATS, input_size=32, channels=3, overwrite=False, summary=None,
                    sample_images=None, opset=ONNX_OPSET):
    """Export ``backbone`` (images in [0, 1] → pooled features) to ``out_dir``; returns the model card dict.

    ``formats``: any of savedmodel, onnx, keras. ``input_size``: side of the random parity images (and the size
    recorded as trained-at; every format accepts any size). ``summary``: a run's summary.json dict for the card.
    ``sample_images``: real images (uint8, or float in [0, 1]) added to the parity check. Raises :class:`ExportError`
    for a non-empty ``out_dir`` without ``overwrite``, an unwritable target, or parity above 1e-4 relative.
    """
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"unknown export format(s) {bad or formats}; choose from {', '.join(FORMATS)}")
    in_channels = backbone.inputs[0].shape[-1]
    if in_channels is not None and in_channels != channels:
        raise ExportError(f"channels={channels} but the backbone takes {in_channels}-channel images")
    out_dir = _target(out_dir, overwrite)
    plain = plain_backbone(backbone)
    batches = _images(int(input_size), channels, sample_images)
    tmp, created = _make_temp(out_dir)
    try:
        if "keras" in formats:
            with warnings.catch_warnings():                        # Keras's own numpy-2 notice, once per weight
                warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
                plain.save(os.path.join(tmp, "backbone.keras"))
        if "savedmodel" in formats:
            root = _Reusable(plain, channels)
            tf.saved_model.save(root, os.path.join(tmp, "saved_model"),
                                signatures={"serving_default": root.serve_uint8, "serve_float": root.serve_float})
        if "onnx" in formats:
            try:
                _save_onnx(plain, os.path.join(tmp, "backbone.onnx"), channels, opset)
            except Exception as e:
                raise ExportError(f"ONNX conversion failed (opset {opset}): {type(e).__name__}: {_first_line(e)}; try "
                                  f"another opset or leave onnx out of the formats") from e
        parity = _parity(backbone, plain, tmp, formats, batches)
        reference = batches[-1]                     # the real samples when given, else the odd-size random batch
        feats = backbone(reference.astype(np.float32) / 255.0, training=False)
        np.savez_compressed(os.path.join(tmp, "parity.npz"), images=reference,
                            features=np.asarray(feats[0] if isinstance(feats, (list, tuple)) else feats, np.float32))
        worst = {k: v for k, v in parity.items() if not v["max_rel"] <= PARITY_RTOL}
        if worst:
            raise ExportError(f"exported model differs from the Keras backbone beyond {PARITY_RTOL} relative: "
                              f"{json.dumps(worst)}; nothing was written")
        summary, n = summary or {}, f"[N, H, W, {channels}]"
        norm = next((l.get_config() for l in plain.layers if isinstance(l, keras.layers.Normalization)), None)
        endpoints = {"savedmodel serving_default": f"images uint8 {n} in 0..255",
                     "savedmodel serve_float, __call__, features": f"images float32 {n} in [0, 1]",
                     "onnx": f"images float32 {n} in [0, 1]", "keras": f"float32 {n} in [0, 1]"}
        card = {"format_version": 1, "name": os.path.basename(out_dir),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "training": {k: summary.get(k) for k in TRAINING_KEYS},
                "evaluation": {k: summary[k] for k in EVAL_KEYS if summary.get(k) is not None},
                "input": {"layout": "NHWC, any N, H, W", "channels": channels, "trained_size": int(input_size),
                          "endpoints": {k: v for k, v in endpoints.items() if k.split()[0] in formats},
                          "normalization": norm and {"mean": norm["mean"], "std": np.sqrt(norm["variance"]).tolist()}},
                "output": {"name": "features", "features": [None, int(plain.outputs[0].shape[-1])]},
                "formats": {f: {"savedmodel": "saved_model", "onnx": "backbone.onnx", "keras": "backbone.keras"}[f]
                            for f in formats},
                "onnx_opset": opset if "onnx" in formats else None, "parity": parity,
                "parity_tolerance_rel": PARITY_RTOL, "parity_images": [list(b.shape) for b in batches],
                "versions": _versions()}
        card["files"] = _files(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_readme(card))
        card["files"] = _files(tmp)                # now with README.md; model_card.json cannot hash itself
        with open(os.path.join(tmp, "model_card.json"), "w") as f:
            json.dump(card, f, indent=2)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return card


def export_run(workdir, out_dir, checkpoint=None, **kw):
    """Export the backbone of the run in ``workdir`` (its config.yaml and ``checkpoints/last.weights.h5``).

    The method model is rebuilt from the recipe with the data source's class count and mean/std; a few held-out
    images of the source join the parity check. Keyword arguments go to :func:`export_backbone`.
    """
    from tfssl import config, data, methods
    recipe = os.path.join(workdir, "config.yaml")
    if not os.path.isfile(recipe):
        raise ExportError(f"no config.yaml in {workdir}; pass the --workdir of a `tfssl pretrain` run")
    checkpoint = checkpoint or os.path.join(workdir, "checkpoints", "last.weights.h5")
    if not os.path.isfile(checkpoint):
        raise ExportError(f"checkpoint not found: {checkpoint}; pass --checkpoint FILE or finish an epoch first")
    _target(out_dir, kw.get("overwrite", False))                # fail fast, before building anything
    cfg = config.load(recipe)
    path = os.path.join(workdir, "summary.json")
    summary = json.load(open(path)) if os.path.isfile(path) else {}
    source = data.load_source(cfg.data)
    if kw.get("sample_images") is None:
        split = source.test if source.test is not None else source.train
        kw["sample_images"] = next(iter(split.batch(16).take(1)))["image"].numpy()
    model = methods.build(cfg, source.num_classes, source.mean, source.std)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_weights(checkpoint)
    except (ValueError, OSError, KeyError) as e:
        detail = _first_line(e).split(" Target variable")[0].split(" Expected:")[0]
        raise ExportError(f"checkpoint {checkpoint} does not fit the model of {recipe} ({type(cfg.method).method_name},"
                          f" backbone {cfg.model.backbone}, width {cfg.model.width}); was it written by another run "
                          f"or backbone? Keras: {detail}") from None
    summary = {"method": type(cfg.method).method_name, "backbone": cfg.model.backbone, "width": cfg.model.width,
               "dataset": source.name,
               **summary, "recipe_sha256": sha256_file(recipe), "checkpoint": os.path.abspath(checkpoint),
               "checkpoint_sha256": sha256_file(checkpoint)}
    kw.setdefault("input_size", cfg.export.input_size or cfg.augment.size)
    kw.setdefault("channels", cfg.data.channels)
    kw.setdefault("formats", tuple(cfg.export.formats))
    return export_backbone(model.backbone, out_dir, summary=summary, **kw)

