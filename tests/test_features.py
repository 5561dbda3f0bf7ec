"""Evaluation features: exported backbones (export dir, .keras, SavedModel, ONNX) embed like the Keras backbone, and
the per-checkpoint feature cache is read back instead of recomputed."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl.backbones import build_backbone
from tfssl.eval import features as F
from tfssl.export import export_backbone

pytestmark = pytest.mark.xdist_group("features_export")   # its module fixture is built once, in one process


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(1)
    backbone = build_backbone("tiny", mean=(0.4,) * 3, std=(0.25,) * 3)
    out = str(tmp_path_factory.mktemp("feat") / "export")
    export_backbone(backbone, out)
    images = np.random.default_rng(0).uniform(0, 1, (20, 32, 32, 3)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(20) % 3)).batch(8)
    return backbone, out, ds


@pytest.mark.parametrize("which", ["dir", "keras", "saved_model", "onnx"])
def test_exported_backbones_embed_like_keras(exported, which):
    backbone, out, ds = exported
    path = {"dir": out, "keras": os.path.join(out, "backbone.keras"), "saved_model": os.path.join(out, "saved_model"),
            "onnx": os.path.join(out, "backbone.onnx")}[which]
    ref, ref_y = F.embed_any(backbone, ds)
    got, got_y = F.embed_any(F.load_backbone(path), ds)
    np.testing.assert_array_equal(got_y, ref_y)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_feature_cache_is_reused_and_atomic(exported, tmp_path, monkeypatch):
    backbone, _, ds = exported
    first = F.cached_embed(backbone, ds, str(tmp_path), "abc-test")
    assert os.listdir(tmp_path) == ["abc-test.npz"]
    monkeypatch.setattr(F, "embed_any", lambda *a: pytest.fail("recomputed although cached"))
    again = F.cached_embed(backbone, ds, str(tmp_path), "abc-test")
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def test_sha_and_bad_paths(exported, tmp_path):
    _, out, _ = exported
    assert F.file_sha256(out) != F.file_sha256(os.path.join(out, "backbone.keras"))
    assert F.file_sha256(out) == F.file_sha256(out)
    with pytest.raises(ValueError, match="not an export directory"):
        F.load_backbone(str(tmp_path))
