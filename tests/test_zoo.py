"""The model zoo: manifest entries from an export, hash verification of downloads, and the fine-tunable loader."""
import json
import os

import keras
import numpy as np
import pytest

from tfssl import cli, zoo
from tfssl.backbones import build_backbone
from tfssl.export import export_backbone

pytestmark = pytest.mark.xdist_group("zoo_export")   # its module fixture is built once, in one process


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(0)
    backbone = build_backbone("tiny", sync_bn=True, mean=(0.3,) * 3, std=(0.2,) * 3)
    out = str(tmp_path_factory.mktemp("zoo") / "tiny_export")
    export_backbone(backbone, out, formats=("keras",), summary={"method": "wcl", "backbone": "tiny",
                                                                "dataset": "fashion_mnist", "knn_top1": 0.5})
    return backbone, out


def test_add_list_and_replace(exported, tmp_path, capsys):
    _, out = exported
    manifest = str(tmp_path / "zoo.json")
    e = zoo.add(out, "tiny_test", manifest)
    assert e["training"]["method"] == "wcl" and e["evaluation"] == {"knn_top1": 0.5}
    assert "backbone.keras" in e["files"] and len(e["files"]["backbone.keras"]["sha256"]) == 64
    on_disk = json.load(open(manifest))
    assert on_disk["models"]["tiny_test"]["location"] == os.path.relpath(out, str(tmp_path))
    with pytest.raises(zoo.ZooError, match="already exists.*--replace"):
        zoo.add(out, "tiny_test", manifest)
    zoo.add(out, "tiny_test", manifest, replace=True)
    assert cli.main(["zoo", "list", "--manifest", manifest]) == 0
    assert "tiny_test" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_verify_files_and_directories(exported, tmp_path, capsys):
    _, out = exported
    manifest = str(tmp_path / "zoo.json")
    zoo.add(out, "tiny_test", manifest)
    assert zoo.verify(os.path.join(out, "backbone.keras"), manifest=manifest) == "tiny_test"
    assert zoo.verify(out, "tiny_test", manifest) == "tiny_test"
    assert cli.main(["zoo", "verify", os.path.join(out, "backbone.keras"), "--manifest", manifest]) == 0
    assert "matches zoo entry 'tiny_test'" in capsys.readouterr().out
    corrupt = tmp_path / "download.keras"
    blob = bytearray(open(os.path.join(out, "backbone.keras"), "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(blob))
    with pytest.raises(zoo.ZooError, match="matches no file"):
        zoo.verify(str(corrupt), manifest=manifest)
    assert cli.main(["zoo", "verify", str(corrupt), "--manifest", manifest]) == 2
    assert "corrupt" in capsys.readouterr().err
    with pytest.raises(zoo.ZooError, match="no zoo entry 'nope'.*known: tiny_test"):
        zoo.verify(out, "nope", manifest)


def test_load_by_name_gives_a_fine_tunable_layer(exported, tmp_path):
    backbone, out = exported
    manifest = str(tmp_path / "zoo.json")
    zoo.add(out, "tiny_test", manifest)
    layer = zoo.load("tiny_test", manifest=manifest)
    images = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(layer(images, training=False).numpy(), backbone(images, training=False).numpy(),
                               atol=1e-5)
    head = keras.layers.Dense(3)
    model = keras.Sequential([keras.Input((32, 32, 3)), layer, head])
    before = [w.numpy().copy() for w in layer.trainable_weights]
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    assert any(np.abs(w.numpy() - b).max() > 0 for w, b in zip(layer.trainable_weights, before))
    assert all(np.isfinite(w.numpy()).all() for w in layer.weights)
    frozen = zoo.load(out, trainable=False)
    assert not frozen.trainable_weights and frozen.weights


def test_load_errors_are_clear(exported, tmp_path):
    _, out = exported
    manifest = str(tmp_path / "zoo.json")
    zoo.add(out, "remote", manifest, location="https://example.org/tiny_export")
    with pytest.raises(zoo.ZooError, match="download it"):
        zoo.load("remote", manifest=manifest)
    zoo.add(out, "moved", manifest, location=str(tmp_path / "gone"))
    with pytest.raises(zoo.ZooError, match="not found"):
        zoo.load("moved", manifest=manifest)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(zoo.ZooError, match="cannot read the zoo manifest"):
        zoo.load("x", manifest=str(tmp_path / "bad.json"))
    with pytest.raises(zoo.ZooError, match="no model_card.json"):
        zoo.add(str(tmp_path), "empty", manifest)


def test_shipped_manifest_is_valid():
    data = zoo.read_manifest()
    for name, e in data["models"].items():
        assert e["name"] == name and e["files"] and all(len(m["sha256"]) == 64 for m in e["files"].values())
        assert {"method", "backbone", "dataset"} <= set(e["training"]) and e["location"]


def test_check_parity_catches_a_changed_file(exported, tmp_path, monkeypatch):
    import shutil
    _, out = exported
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    manifest = str(tmp_path / "zoo.json")
    zoo.add(copy, "tiny_copy", manifest)
    assert zoo.check_parity("tiny_copy", manifest)["keras"] < 1e-5
    with np.load(os.path.join(copy, "parity.npz")) as f:
        images, features = f["images"], f["features"]
    np.savez_compressed(os.path.join(copy, "parity.npz"), images=images, features=features * 1.01)
    with pytest.raises(zoo.ZooError, match="does not match the manifest"):   # the hashes are checked first
        zoo.check_parity("tiny_copy", manifest)
    monkeypatch.setattr(zoo, "_check_files", lambda root, files: [])        # and the features on their own
    with pytest.raises(zoo.ZooError, match="keras backbone's features differ"):
        zoo.check_parity("tiny_copy", manifest)


METHODS = ("ressl", "wcl", "csml", "simclr", "mocov2")
MODELS = os.path.join(os.path.dirname(zoo.MANIFEST), "models")


def _shipped():
    """Manifest entries whose files are committed under export/models/."""
    return {n: e for n, e in zoo.read_manifest()["models"].items() if e["location"].startswith("models/")}


def test_every_method_ships_a_small_fashion_mnist_backbone_that_loads_offline_by_name():
    """A fresh clone holds each method's Fashion-MNIST backbone (every file under 2 MB, hashes checked by ``load``)
    and ``tfssl.zoo.load("<method>_fashion_mnist")`` gives a Keras model of 28×28 gray images → features; every
    directory under export/models/ is a manifest entry and the other way round."""
    shipped = _shipped()
    assert sorted(shipped) == sorted(f"{m}_fashion_mnist" for m in METHODS)
    assert sorted(os.listdir(MODELS)) == sorted(os.path.basename(e["location"]) for e in shipped.values())
    x = np.random.default_rng(0).uniform(0, 1, (2, 28, 28, 1)).astype("float32")
    for name, e in shipped.items():
        assert e["training"]["method"] == name.split("_")[0] and e["training"]["dataset"] == "fashion_mnist"
        assert e["training"]["num_train"] == 60000
        for rel, meta in e["files"].items():
            assert meta["bytes"] < 2 * 1024 * 1024, f"{name}/{rel} is {meta['bytes']} bytes"
        backbone = zoo.load(name, trainable=False)
        features = np.asarray(backbone(x, training=False))
        assert features.shape == (2, e["output"]["features"][1]) and np.all(np.isfinite(features))
        assert zoo.path(name) == os.path.join(MODELS, os.path.basename(e["location"]))


@pytest.mark.slow     # five SavedModels and ONNX sessions
def test_every_shipped_backbone_gives_its_recorded_features_in_every_format():
    for name in _shipped():
        errors = zoo.check_parity(name)
        assert set(errors) == {"keras", "savedmodel_serve", "savedmodel_uint8", "onnx"}, errors
        assert max(errors.values()) <= 1e-4, (name, errors)


def test_a_shipped_file_that_changed_is_refused_by_name(tmp_path):
    """A clone whose shipped file was altered (a bad merge, a partial checkout) is refused, naming the file."""
    import shutil
    name, e = sorted(_shipped().items())[0]
    copy = tmp_path / "models" / os.path.basename(e["location"])
    shutil.copytree(zoo.path(name), copy)
    manifest = str(tmp_path / "zoo.json")
    json.dump({"format_version": 1, "models": {name: e}}, open(manifest, "w"))
    assert zoo.path(name, manifest) == str(copy)
    with open(copy / "backbone.keras", "ab") as f:
        f.write(b"\0")
    with pytest.raises(zoo.ZooError, match=r"does not match the manifest: backbone.keras \(sha256 differs\)"):
        zoo.load(name, manifest=manifest)
