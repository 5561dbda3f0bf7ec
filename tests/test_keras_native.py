"""tfssl.methods.keras_native and the Keras side of views and exports: every method saves and loads as ``.keras``
and trains on identically; ModelCheckpoint, evaluate and export work; view layers (and foreign Keras / keras-cv
layers in a recipe) serialise; the SavedModel serves Keras 3's TFSMLayer (inference and fine-tuning) and TF Hub."""
import dataclasses
import json
import os
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfssl
from conftest import tiny_config
from helpers import CASES, case_views
from tfssl import config, methods
from tfssl import views as V
from tfssl.optim import SGD, build_optimizer

pytestmark = pytest.mark.xdist_group("native_export")   # its module fixture is built once, in one process


def _compiled(cfg, views=None):
    model = methods.build(cfg, num_classes=10, total_steps=20, steps_per_epoch=10, on_device_views=views)
    model.compile(build_optimizer(cfg.train, 20, 10), probe_optimizer=SGD(0.1, momentum=0.9, name="probe_sgd"))
    return model


def _batch(cfg, seed):
    views, labels = case_views(cfg, seed)
    return tf.data.Dataset.from_tensors({"views": views, "label": labels})


def _optimizer_state(model):
    return [v.numpy() for opt in (model.optimizer, model.probe_optimizer) for v in opt.variables]


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [CASES[i] for i in (0, 2, 3, 5, 8)], ids=lambda x: str(x))
def test_save_load_then_one_step_equals_the_original(name, params, tmp_path):
    """model.save("*.keras") → keras.saving.load_model (safe mode, no custom_objects) holds every weight and slot
    of the original (student, teacher, queues, probe, BN statistics, both optimizers) and the next step is the same."""
    keras.utils.set_random_seed(0)
    cfg = tiny_config(name, **params)
    cfg.train.warmup_epochs = 0.5                   # a schedule in the middle of its warm-up: lr depends on the step
    model = _compiled(cfg)
    model.fit(_batch(cfg, 0), epochs=1, verbose=0)  # slots, counters and queues are no longer at their start
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    with zipfile.ZipFile(path) as z:
        assert f'"class_name": "{type(model).__name__}"' in z.read("config.json").decode()
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model) and loaded.get_config() == model.get_config()
    assert loaded.get_config()["augment"] == dataclasses.asdict(cfg.augment)    # the recipe's augment section
    for a, b, v in zip(model.get_weights(), loaded.get_weights(), model.weights):
        np.testing.assert_array_equal(a, b, err_msg=v.path)
    for a, b in zip(_optimizer_state(model), _optimizer_state(loaded)):
        np.testing.assert_array_equal(a, b)
    assert int(loaded.optimizer.iterations.numpy()) == 1
    h1 = model.fit(_batch(cfg, 1), epochs=1, verbose=0).history
    h2 = loaded.fit(_batch(cfg, 1), epochs=1, verbose=0).history
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-6, atol=1e-6)
    for a, b, v in zip(model.get_weights(), loaded.get_weights(), model.weights):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6, err_msg=v.path)


def test_model_checkpoint_keras_file_and_on_device_views_round_trip(tmp_path):
    cfg = tiny_config("mocov2", queue_size=32)
    model = _compiled(cfg, views=methods.views_for(cfg))
    images = np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3)).astype("uint8")
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": np.arange(16) % 10}).batch(8)
    path = str(tmp_path / "ckpt.keras")
    model.fit(ds, epochs=1, verbose=0, callbacks=[keras.callbacks.ModelCheckpoint(path)])
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.views, V.Views) and loaded.views.get_config() == model.views.get_config()
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_evaluate_reports_the_probe_and_says_what_it_needs():
    cfg = tiny_config("simclr")
    model = _compiled(cfg)
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 255, (24, 32, 32, 3)).astype("uint8"), rng.integers(0, 10, 24)
    result = model.evaluate(tf.data.Dataset.from_tensor_slices((images, labels)).batch(8), verbose=0,
                            return_dict=True)
    logits = model.probe(model.backbone(images.astype("float32") / 255.0, training=False)).numpy()
    expect_ce = np.mean(-np.log(np.exp(logits[np.arange(24), labels]) / np.exp(logits).sum(1)))
    assert abs(result["probe_loss"] - expect_ce) < 1e-4
    assert abs(result["probe_acc"] - np.mean(logits.argmax(1) == labels)) < 1e-6
    as_dicts = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(8)
    assert abs(model.evaluate(as_dicts, verbose=0, return_dict=True)["probe_acc"] - result["probe_acc"]) < 1e-6
    with pytest.raises(ValueError, match="model.evaluate needs labelled images.*have no labels"):
        model.evaluate(tf.data.Dataset.from_tensor_slices(images).batch(8), verbose=0)
    views = tuple(images.astype("float32") / 255.0 for _ in range(2))
    with pytest.raises(ValueError, match="training batches of views.*eval_pipeline"):
        model.evaluate(tf.data.Dataset.from_tensor_slices({"views": views, "label": labels}).batch(8), verbose=0)


def test_export_writes_the_backbone_like_tfssl_export(tmp_path):
    model = _compiled(tiny_config("ressl", queue_size=32))
    card = model.export(str(tmp_path / "out"), format="tf_saved_model", verbose=False)
    assert card["formats"] == {"savedmodel": "saved_model"} and os.path.isfile(tmp_path / "out" / "model_card.json")
    x = np.random.default_rng(2).uniform(0, 1, (3, 32, 32, 3)).astype("float32")
    served = keras.layers.TFSMLayer(str(tmp_path / "out" / "saved_model"))(x)      # Keras 3's default endpoint
    np.testing.assert_allclose(np.asarray(served), model.backbone(x, training=False).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="choose tfssl"):
        model.export(str(tmp_path / "x"), format="tflite")


# ----------------------------------------------------------------------------------------------- view layers

def test_view_layers_save_and_reload_in_a_sequential(tmp_path):
    """tfssl's view layers (with seeds) and a Keras core layer in a keras.Sequential: saved, reloaded, the same
    config, and from the same seed state the same draws."""
    def make():
        return keras.Sequential([keras.Input((28, 28, 3)), V.RandomResizedCrop(24, (0.3, 1.0), seed=1),
                                 V.RandomFlip(seed=2), V.ColorJitter(0.4, 0.4, 0.4, 0.1, seed=3),
                                 V.RandomGrayscale(0.5, seed=4), V.GaussianBlur(24, seed=5),
                                 V.RandomSolarize(0.5, seed=6)])
    x = tf.constant(np.random.default_rng(3).uniform(0, 1, (6, 28, 28, 3)), tf.float32)
    seq = make()
    path = str(tmp_path / "views.keras")
    seq.save(path)
    loaded = keras.saving.load_model(path)
    assert [type(a) for a in loaded.layers] == [type(b) for b in seq.layers]
    assert [a.get_config() for a in loaded.layers] == [b.get_config() for b in seq.layers]
    np.testing.assert_allclose(loaded(x).numpy(), seq(x).numpy(), atol=1e-6)      # same seed generators' state
    again = make()(x).numpy()                                                     # a fresh copy draws the same
    np.testing.assert_allclose(again, make()(x).numpy(), atol=1e-6)
    views = V.Views(("strong", "weak"), "cifar", 24, small_crops=1, warmup_recipes=("weak", "weak"), warmup_steps=3)
    rebuilt = V.Views.from_config(views.get_config())
    assert rebuilt.count == views.count == 3 and rebuilt.scheduled


EXTRA = [{"layer": "RandomColorJitter", "args": {"value_range": [0, 1], "brightness_factor": 0.3, "seed": 1},
          "recipes": ["strong"]},
         {"layer": "keras_cv.layers.RandAugment", "args": {"value_range": [0, 1], "magnitude": 0.3, "seed": 2},
          "recipes": ["weak"]}]


@pytest.mark.slow
def test_keras_core_and_keras_cv_layers_in_a_recipe():
    """augment.extra names a Keras core layer and a keras-cv layer: both run in the tf.data placement; on the device
    under XLA the core layer compiles and the keras-cv one (HistogramFixedWidth) is one clear error."""
    cfg = config.load("ressl_fashion_mnist", ["augment.extra=" + str(EXTRA).replace("'", '"'),
                                              "model.projector_hidden=32", "method.queue_size=32", "augment.size=32",
                                              "data.image_size=32", "data.channels=3"])
    assert cfg.augment.extra == EXTRA
    views = methods.views_for(cfg)
    assert [type(l.inner).__name__ for l in views.large[0].layers if isinstance(l, V.Extra)] == ["RandomColorJitter"]
    assert [type(l.inner).__name__ for l in views.large[1].layers if isinstance(l, V.Extra)] == ["RandAugment"]
    images = np.random.default_rng(4).integers(0, 255, (8, 32, 32, 3)).astype("uint8")
    out = next(iter(tf.data.Dataset.from_tensors(images).map(lambda x: views(x))))
    assert [tuple(o.shape) for o in out] == [(8, 32, 32, 3)] * 2
    assert all(0 <= float(tf.reduce_min(o)) and float(tf.reduce_max(o)) <= 1 for o in out)
    model = methods.build(cfg, num_classes=10, on_device_views=views)
    model.compile(SGD(0.1), jit_compile=True)
    with pytest.raises(config.ConfigError, match="HistogramFixedWidth has no XLA kernel"):
        model.make_train_function()
    only_core = methods.views_for(config.load("ressl_fashion_mnist", ["augment.size=32", "augment.extra="
                                                                     + str(EXTRA[:1])
                                                                     .replace("'", '"')]))
    model = methods.build(cfg, num_classes=10, on_device_views=only_core)
    model.compile(SGD(0.1), jit_compile=True)
    model.check_views_compile(32)                          # Keras's RandomColorJitter compiles


def test_a_bad_extra_layer_is_one_clear_error():
    for spec, message in (({"layer": "NoSuchLayer"}, "not found"), ({"layer": "RandomColorJitter", "args":
                          {"no_such_arg": 1}}, "cannot be built"), ({"name": "x"}, "expected {layer")):
        cfg = config.load("ressl_fashion_mnist", ["augment.extra=[" + str(spec).replace("'", '"') + "]"])
        with pytest.raises(config.ConfigError, match=message):
            methods.views_for(cfg)


def test_saved_views_load_in_a_fresh_process_that_imported_only_tfssl(tmp_path):
    """`import tfssl` registers the view layers: a saved keras.Sequential of them (with a Keras core layer through
    Extra) loads in a new process with no custom_objects and draws what the original draws from the same seeds."""
    import subprocess
    import sys

    def make():
        return keras.Sequential([keras.Input((28, 28, 3)), V.RandomResizedCrop(24, (0.3, 1.0), seed=1),
                                 V.RandomFlip(seed=2), V.Extra(EXTRA[0])])
    x = np.random.default_rng(5).uniform(0, 1, (4, 28, 28, 3)).astype("float32")
    make().save(str(tmp_path / "views.keras"))
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, keras, tfssl; m = keras.saving.load_model(sys.argv[1] + '/views.keras'); "
            "np.save(sys.argv[1] + '/y.npy', np.asarray(m(np.load(sys.argv[1] + '/x.npy')))); "
            "print(' '.join(type(l).__name__ for l in m.layers))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["RandomResizedCrop", "RandomFlip", "Extra"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), make()(x).numpy(), atol=1e-6)


def test_a_saved_extra_spec_cannot_make_the_loader_call_anything_but_a_keras_layer(tmp_path):
    """Extra rebuilds its layer from the name stored in the file. In safe mode (load_model's default) only keras and
    keras_cv classes are looked up; with safe_mode=False the class must still be a Keras layer; in neither case is
    the named callable called."""
    path, evil = tmp_path / "views.keras", tmp_path / "evil.keras"
    keras.Sequential([keras.Input((8, 8, 3)), V.Extra(EXTRA[0])]).save(str(path))
    marker = tmp_path / "called"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                cfg = json.loads(data)
                spec = cfg["config"]["layers"][1]["config"]["spec"]
                spec.update(layer="os.system", args={"command": f"touch {marker}"})
                data = json.dumps(cfg).encode()
            dst.writestr(item, data)
    with pytest.raises(Exception, match="only keras and keras_cv layers"):
        keras.saving.load_model(str(evil))
    with pytest.raises(Exception, match="not a Keras layer class"):
        keras.saving.load_model(str(evil), safe_mode=False)
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a Keras layer class"):
        V.extra_layer({"layer": "builtins.print", "args": {"end": "called"}})


def test_an_extra_layer_that_fails_in_the_tf_data_graph_is_one_clear_error():
    """A layer that builds but cannot run on the recipe's images (colour jitter's saturation on 1-channel images)
    stops before training with one ConfigError naming the placement, not a tf.data traceback mid-epoch."""
    spec = [{"layer": "RandomColorJitter", "args": {"value_range": [0, 1], "saturation_factor": 0.5}}]
    cfg = config.load("ressl_fashion_mnist", ["data.channels=1", "augment.size=28", "augment.extra=" + json.dumps(spec)])
    with pytest.raises(config.ConfigError, match="fail on a uint8 \\[2, 28, 28, 1\\] batch in a TensorFlow graph"):
        methods.views_for(cfg)


# ---------------------------------------------------------------------------------------------------- exports

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(5)
    from tfssl.backbones import build_backbone
    from tfssl.export import export_backbone
    backbone = build_backbone("tiny", mean=(0.3,) * 3, std=(0.3,) * 3)
    out = str(tmp_path_factory.mktemp("native") / "export")
    export_backbone(backbone, out, formats=("savedmodel", "keras"))
    x = np.random.default_rng(6).uniform(0, 1, (16, 32, 32, 3)).astype("float32")
    return backbone, out, x


def _moving_stats(weights):
    return [w.numpy().copy() for w in weights if "moving" in w.name or "moving" in getattr(w, "path", "")]


def test_tfsm_layer_defaults_and_fine_tuning_update_batch_norm(exported):
    backbone, out, x = exported
    path = os.path.join(out, "saved_model")
    np.testing.assert_allclose(np.asarray(keras.layers.TFSMLayer(path)(x)), backbone(x, training=False).numpy(),
                               atol=1e-5)
    layer = keras.layers.TFSMLayer(path, call_training_endpoint="serve_train", trainable=True)
    model = keras.Sequential([keras.Input((32, 32, 3)), layer, keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before, stats = [w.numpy().copy() for w in layer.trainable_weights], _moving_stats(layer.non_trainable_weights)
    assert before and stats
    # the same fine-tuning step on the .keras backbone, from the same head: TFSMLayer fine-tunes like it does
    reference = keras.Sequential([keras.Input((32, 32, 3)), keras.saving.load_model(os.path.join(out, "backbone.keras")),
                                  keras.layers.Dense(3)])
    reference.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    reference.layers[-1].set_weights(model.layers[-1].get_weights())
    h = model.fit(x, np.arange(16) % 3, epochs=1, batch_size=16, shuffle=False, verbose=0).history
    h_ref = reference.fit(x, np.arange(16) % 3, epochs=1, batch_size=16, shuffle=False, verbose=0).history
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, layer.trainable_weights))
    assert all(not np.array_equal(a, b) for a, b in zip(stats, _moving_stats(layer.non_trainable_weights)))
    np.testing.assert_allclose(h["loss"], h_ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(layer(x)), reference.layers[0](x, training=False).numpy(), atol=1e-4)
    np.testing.assert_allclose(model.layers[-1].get_weights()[0], reference.layers[-1].get_weights()[0], atol=1e-5)


def test_hub_keras_layer_in_tf_keras_infers_fine_tunes_and_reloads(exported, tmp_path):
    """TF Hub's reusable-SavedModel path in tf_keras (Keras 2): inference parity, one fine-tuning step that changes
    every variable and the BatchNorm statistics, and a saved model that reloads with the same outputs."""
    import tensorflow_hub as hub                   # test dependencies: requirements-test.txt (scripts/setup.sh)
    import tf_keras
    backbone, out, x = exported
    layer = hub.KerasLayer(os.path.join(out, "saved_model"), trainable=True)
    np.testing.assert_allclose(layer(x).numpy(), backbone(x, training=False).numpy(), atol=1e-5)
    model = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), layer, tf_keras.layers.Dense(3)])
    model.compile(tf_keras.optimizers.SGD(0.1), tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in layer.trainable_variables]
    stats = [v.numpy().copy() for v in layer.variables if "moving" in v.name]
    model.fit(x, np.arange(16) % 3, epochs=1, batch_size=16, verbose=0)
    assert len(before) == len(backbone.trainable_weights)
    assert all(not np.array_equal(b, v.numpy()) for b, v in zip(before, layer.trainable_variables))
    assert stats and all(not np.array_equal(a, v.numpy()) for a, v in
                         zip(stats, [v for v in layer.variables if "moving" in v.name]))
    path = str(tmp_path / "hub_model")
    model.save(path)
    reloaded = tf_keras.models.load_model(path, custom_objects={"KerasLayer": hub.KerasLayer})
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_config_imports_no_other_tfssl_module():
    """The recipe schema sits below the methods: they register their parameters (config.register_method)."""
    import ast
    tree = ast.parse(open(config.__file__).read())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module] + \
        [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("tfssl")], imported
    assert set(config.METHOD_PARAMS) == set(methods.METHODS) and tfssl.__version__
