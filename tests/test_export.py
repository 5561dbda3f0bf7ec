"""Export (issue #7): a tiny trained backbone → SavedModel / ONNX / .keras with parity, fine-tuning after loading,
no custom-gradient warnings, model card hashes, and bad targets that fail cleanly and leave nothing behind."""
import glob
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import warnings
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import config, export, methods
from tfssl.backbones import SyncBatchNormalization, build_backbone
from tfssl.export import ExportError, export_backbone, export_run, plain_backbone
from tfssl.train import pretrain

pytestmark = pytest.mark.xdist_group("export_run")   # its module fixture is built once, in one process

RUN = ["data.limit=128", "data.test_limit=64", "train.epochs=1", "train.batch_size=32", "train.steps_per_epoch=2",
       "train.verbose=0", "train.jit_compile=false", "model.backbone=tiny", "model.projector_hidden=32",
       "model.projector_dim=16", "method.queue_size=64", "eval.knn_train_limit=128", "eval.knn_k=10"]
RUN += ["data.image_size=32", "augment.size=32", "data.channels=3", "model.backbone=tiny"]   # 32x32x3, as written


def leftovers(parent):
    """Temp or backup directories an export may have left beside its target."""
    return [n for n in os.listdir(parent) if ".tmp-" in n or n.endswith(".old")]


def randomize_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for w in layer.weights:
                w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny ReSSL run (2 steps) and its export; the trained backbone rebuilt from the checkpoint as reference."""
    root = tmp_path_factory.mktemp("export")
    workdir, out = str(root / "run"), str(root / "zoo" / "tiny")
    summary = pretrain(config.load("ressl_fashion_mnist", RUN), workdir, log=lambda *_: None)
    card = export_run(workdir, out)
    cfg = config.load(os.path.join(workdir, "config.yaml"))
    model = methods.build(cfg, 10, (0.286,) * 3, (0.353,) * 3)
    model.load_weights(os.path.join(workdir, "checkpoints", "last.weights.h5"))
    return {"workdir": workdir, "out": out, "card": card, "summary": summary, "backbone": model.backbone,
            "images": np.random.default_rng(1).uniform(0, 1, (5, 27, 27, 3)).astype("float32")}


def test_parity_of_every_format_against_the_trained_backbone(run):
    out, x = run["out"], run["images"]
    ref = run["backbone"](x, training=False).numpy()
    loaded = tf.saved_model.load(os.path.join(out, "saved_model"))
    u8 = np.round(x * 255).astype(np.uint8)
    import onnxruntime as ort
    session = ort.InferenceSession(os.path.join(out, "backbone.onnx"), providers=["CPUExecutionProvider"])
    results = {
        "keras": keras.saving.load_model(os.path.join(out, "backbone.keras"))(x).numpy(),
        "savedmodel_float": loaded.signatures["serve_float"](images=tf.constant(x))["features"].numpy(),
        "savedmodel_call": loaded(tf.constant(x), training=False).numpy(),
        "onnx": session.run(["features"], {"images": x})[0],
    }
    for name, value in results.items():
        assert value.shape == ref.shape == (5, 64)
        assert np.max(np.abs(value - ref)) <= 1e-5, name
    as_uint8 = loaded.signatures["serving_default"](images=tf.constant(u8))["features"].numpy()
    assert np.max(np.abs(as_uint8 - run["backbone"](u8.astype("float32") / 255.0).numpy())) <= 1e-5
    for name, err in run["card"]["parity"].items():                # export's own check, recorded in the card
        assert err["max_abs"] <= 1e-5 and err["max_rel"] <= 1e-4, name
    assert {"keras", "savedmodel_uint8", "savedmodel_float", "onnx"} <= set(run["card"]["parity"])
    assert [16, 32, 32, 3] in run["card"]["parity_images"]          # real Fashion-MNIST images were checked too


def test_onnx_has_named_dynamic_axes_and_recorded_opset(run):
    import onnx
    import onnxruntime as ort
    model = onnx.load(os.path.join(run["out"], "backbone.onnx"))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert model.graph.input[0].name == "images" and dims == ["batch", "height", "width", 3]
    assert model.graph.output[0].name == "features"
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [run["card"]["onnx_opset"]] \
        == [export.ONNX_OPSET]
    session = ort.InferenceSession(os.path.join(run["out"], "backbone.onnx"), providers=["CPUExecutionProvider"])
    for n, size in ((1, 32), (7, 41)):
        assert session.run(None, {"images": np.zeros((n, size, size, 3), np.float32)})[0].shape == (n, 64)


def test_savedmodel_loads_without_custom_gradient_warnings_and_fine_tunes(run, capfd):
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    tf.get_logger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = tf.saved_model.load(os.path.join(run["out"], "saved_model"))
    finally:
        tf.get_logger().removeHandler(handler)
    text = (logs.getvalue() + " ".join(str(w.message) for w in caught) + capfd.readouterr().err).lower()
    assert "custom gradient" not in text and "no gradient defined" not in text
    assert len(loaded.trainable_variables) == len(run["backbone"].trainable_weights) > 0
    assert len(loaded.variables) == len(run["backbone"].weights)
    before = [v.numpy().copy() for v in loaded.trainable_variables]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(loaded(tf.constant(run["images"]), training=True)))
    grads = tape.gradient(loss, loaded.trainable_variables)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    keras.optimizers.SGD(0.1).apply_gradients(zip(grads, loaded.trainable_variables))
    assert all(not np.array_equal(b, v.numpy()) for b, v in zip(before, loaded.trainable_variables))


def features_of(run):
    return run["backbone"](run["images"], training=False).numpy()


def test_tfsm_layer_inference_and_fine_tuning(run):
    path = os.path.join(run["out"], "saved_model")
    u8 = np.round(run["images"] * 255).astype(np.uint8)
    serving = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
    features = serving(u8)["features"].numpy()
    assert np.max(np.abs(features - run["backbone"](u8.astype("float32") / 255.0).numpy())) <= 1e-5
    layer = keras.layers.TFSMLayer(path, call_endpoint="features", call_training_endpoint="features_train")
    before = [w.numpy().copy() for w in layer.trainable_weights]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(layer(run["images"], training=True)))
    grads = tape.gradient(loss, layer.trainable_weights)
    assert grads and all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    keras.optimizers.SGD(0.1).apply_gradients(zip(grads, layer.trainable_weights))
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, layer.trainable_weights))
    assert np.max(np.abs(layer(run["images"]).numpy() - features_of(run))) > 1e-4     # the layer really changed


def test_keras_file_is_stock_keras(run):
    path = os.path.join(run["out"], "backbone.keras")
    with zipfile.ZipFile(path) as z:
        assert "tfssl" not in z.read("config.json").decode()     # no registered tfssl classes inside
    model = keras.saving.load_model(path)                          # default safe_mode, no custom_objects
    assert not any(isinstance(l, SyncBatchNormalization) for l in model.layers)
    assert all(type(l).__module__.startswith("keras.") for l in model.layers)


def test_formats_load_in_a_process_without_tfssl(run):
    script = ("import sys, numpy as np, keras, tensorflow as tf, onnxruntime as ort\n"
              "out = sys.argv[1]; x = np.full((2, 32, 32, 3), 0.5, np.float32)\n"
              "a = keras.saving.load_model(out + '/backbone.keras')(x).numpy()\n"
              "b = tf.saved_model.load(out + '/saved_model')(x, training=False).numpy()\n"
              "c = ort.InferenceSession(out + '/backbone.onnx').run(['features'], {'images': x})[0]\n"
              "assert 'tfssl' not in sys.modules\n"
              "print(float(np.abs(a - b).max()), float(np.abs(a - c).max()))\n")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", script, run["out"]], capture_output=True, text=True, env=env,
                          cwd=run["out"], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert max(map(float, done.stdout.split())) <= 1e-5


def test_plain_backbone_equals_sync_bn_original():
    original = build_backbone("tiny", sync_bn=True, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), with_stage3=True)
    randomize_bn(original)
    assert any(isinstance(l, SyncBatchNormalization) for l in original.layers)
    plain = plain_backbone(original)
    assert not any(isinstance(l, SyncBatchNormalization) for l in plain.layers)
    x = np.random.default_rng(2).uniform(0, 1, (3, 20, 20, 3)).astype("float32")
    pooled, _ = original(x, training=False)
    assert np.max(np.abs(plain(x, training=False).numpy() - pooled.numpy())) <= 1e-6


def test_model_card_fields_and_hashes_match_the_files(run):
    out, card = run["out"], json.load(open(os.path.join(run["out"], "model_card.json")))
    on_disk = {os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
               if os.path.isfile(p)}
    assert set(card["files"]) == on_disk - {"model_card.json"}
    assert {"README.md", "backbone.onnx", "backbone.keras", "saved_model/saved_model.pb"} <= set(card["files"])
    assert any(p.startswith("saved_model/variables/") for p in card["files"])
    for rel, entry in card["files"].items():
        data = open(os.path.join(out, rel), "rb").read()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    summary, training = run["summary"], card["training"]
    assert (training["method"], training["backbone"], training["width"], training["dataset"], training["epochs"]) == \
        ("ressl", "tiny", 1.0, "fashion_mnist", 1)
    recipe = open(os.path.join(run["workdir"], "config.yaml"), "rb").read()
    assert training["recipe_sha256"] == hashlib.sha256(recipe).hexdigest()
    assert card["evaluation"]["knn_top1"] == summary["knn_top1"]
    assert card["input"]["channels"] == 3 and card["input"]["trained_size"] == 32
    assert card["input"]["normalization"]["mean"] == pytest.approx([0.286] * 3)
    assert card["output"]["features"] == [None, 64] and card["onnx_opset"] == 17
    assert set(card["versions"]) >= {"tfssl", "tensorflow", "keras", "onnx", "onnxruntime", "tf2onnx"}
    assert "ressl tiny" in open(os.path.join(out, "README.md")).read()


def test_non_empty_target_needs_overwrite_and_overwrite_replaces_only_exports(tmp_path):
    backbone = build_backbone("tiny")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ExportError, match="--overwrite"):
        export_backbone(backbone, str(out), formats=("keras",))
    with pytest.raises(ExportError, match="not a tfssl export"):       # --overwrite never deletes other folders
        export_backbone(backbone, str(out), formats=("keras",), overwrite=True)
    assert os.listdir(out) == ["keep.txt"] and not leftovers(tmp_path)
    (out / "keep.txt").unlink()                                         # an empty directory is a fine target
    export_backbone(backbone, str(out), formats=("keras",))
    card = export_backbone(build_backbone("tiny", with_stage3=True), str(out), formats=("keras",), overwrite=True)
    assert sorted(os.listdir(out)) == ["README.md", "backbone.keras", "model_card.json", "parity.npz"]
    assert card["output"]["features"] == [None, 64]                    # the pooled output only
    assert json.load(open(out / "model_card.json"))["files"] == card["files"]
    assert set(card["parity"]) == {"keras_plain", "keras"} and not leftovers(tmp_path)


def test_unwritable_target_is_one_clear_error(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ExportError, match="cannot write the export"):
        export_backbone(build_backbone("tiny"), str(tmp_path / "file.txt" / "sub" / "out"), formats=("keras",))
    with pytest.raises(ExportError, match="not a directory"):
        export_backbone(build_backbone("tiny"), str(tmp_path / "file.txt"), formats=("keras",))
    assert os.listdir(tmp_path) == ["file.txt"]


def test_failed_parity_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PARITY_RTOL", -1.0)              # every format "fails" after being written
    with pytest.raises(ExportError, match="differs from the Keras backbone"):
        export_backbone(build_backbone("tiny"), str(tmp_path / "new" / "out"), formats=("keras",))
    assert os.listdir(tmp_path) == []                              # not even the parent it had to create


def test_checkpoint_from_another_backbone_is_one_clear_error(run, tmp_path):
    cfg = config.load(os.path.join(run["workdir"], "config.yaml"), ["model.width=0.5"])
    other = methods.build(cfg, 10)
    path = str(tmp_path / "other.weights.h5")
    other.save_weights(path)
    with pytest.raises(ExportError, match="does not fit the model") as info:
        export_run(run["workdir"], str(tmp_path / "out"), checkpoint=path)
    assert "backbone tiny" in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(tmp_path) == ["other.weights.h5"]
