"""``tfssl eval`` end to end on a tiny pretraining run: every protocol's figures equal the library functions applied
to independently computed features, land in summary.json under eval.<protocol>.<subject> beside (not over) the
online figures, and exported backbones and baselines are evaluated the same way."""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from tfssl import cli, config, data, methods
from tfssl.eval import protocols
from tfssl.eval.knn import embed, knn_report
from tfssl.eval.linear import linear_probe
from tfssl.train import pretrain

pytestmark = pytest.mark.xdist_group("eval_run")   # its module fixture is built once, in one process

QUICK = ["data.limit=256", "data.test_limit=128", "train.epochs=1", "train.batch_size=64", "train.verbose=0",
         "train.jit_compile=false", "model.projector_hidden=64", "eval.knn_train_limit=256", "method.queue_size=256"]
QUICK += ["data.image_size=32", "augment.size=32", "data.channels=3", "model.backbone=tiny"]   # 32x32x3, as written


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("evalrun"))
    pretrain(config.load("ressl_fashion_mnist", QUICK), workdir, log=lambda *_: None)
    return workdir


def _summary(workdir):
    return json.load(open(os.path.join(workdir, "summary.json")))


def _reference_features(workdir, weights=True):
    cfg = config.load(os.path.join(workdir, "config.yaml"))
    source = data.load_source(cfg.data)
    import keras
    keras.utils.set_random_seed(cfg.train.seed)
    model = methods.build(cfg, source.num_classes, source.mean, source.std)
    if weights:
        model.load_weights(os.path.join(workdir, "checkpoints", "last.weights.h5"))
    return (embed(model.backbone, data.eval_pipeline(source.train, 100)),
            embed(model.backbone, data.eval_pipeline(source.test, 100)), source.num_classes)


def test_pretraining_logs_collapse_monitors(run):
    history = _summary(run)["history"]
    for key in ("emb_std", "emb_std_reference", "emb_effective_rank", "emb_uniformity", "emb_alignment"):
        assert np.isfinite(history[key][-1])
    assert history["emb_std_reference"][-1] == pytest.approx(1 / np.sqrt(64))   # tiny net: 64-d features


def test_knn_equals_reference_and_is_recorded_beside_online_figures(run, capsys):
    online = {k: _summary(run)[k] for k in ("knn_top1", "probe_top1")}
    assert cli.main(["eval", "knn", "--workdir", run]) == 0
    assert "kNN majority (k=20)" in capsys.readouterr().out
    stored = _summary(run)["eval"]["knn"]["checkpoint"]
    (bank, bank_y), (test, test_y), classes = _reference_features(run)
    ref = knn_report(bank, bank_y, test, test_y, classes, 200, 0.1, 20)
    for kind in ("weighted", "majority"):
        assert stored[kind]["top1"] == pytest.approx(ref[kind]["top1"], abs=1 / len(test_y) + 1e-9)
        assert stored[kind]["top5"] == pytest.approx(ref[kind]["top5"], abs=1 / len(test_y) + 1e-9)
    assert stored["bank_size"] == 256 and stored["test_size"] == 128
    assert stored["origin"].endswith("last.weights.h5")
    assert {k: _summary(run)[k] for k in online} == online          # online numbers are never overwritten
    q = stored["quality"]
    assert 0 < q["std"] and q["std_reference"] == pytest.approx(1 / 8) and 1 <= q["effective_rank"] <= 64
    assert 0 <= q["alignment"] <= 4 and q["uniformity"] < 0
    cache = glob.glob(os.path.join(run, "eval_cache", "*.npz"))
    assert len(cache) == 2                                          # train + test, embedded once
    mtimes = [os.path.getmtime(p) for p in cache]
    assert cli.main(["eval", "knn", "--workdir", run]) == 0         # second run reads the cache
    assert [os.path.getmtime(p) for p in cache] == mtimes


def test_baselines_pixels_and_random_init(run):
    pixels = protocols.open_subject(run, baseline="pixels")
    (bank, bank_y), (test, test_y) = protocols.features(pixels, "train"), protocols.features(pixels, "test")
    source = pixels.source
    raw = lambda ds: np.concatenate([b["image"].numpy() for b in ds.batch(512)]).reshape(-1, 32 * 32 * 3) / 255.0
    np.testing.assert_allclose(bank, raw(source.train), atol=1e-7)
    np.testing.assert_allclose(test, raw(source.test), atol=1e-7)
    random_init = protocols.open_subject(run, baseline="random_init")
    (ref_bank, _), _, _ = _reference_features(run, weights=False)
    np.testing.assert_allclose(protocols.features(random_init, "train")[0], ref_bank, atol=1e-5)
    trained = protocols.features(protocols.open_subject(run), "train")[0]
    assert np.abs(trained - ref_bank).max() > 1e-3                 # a different subject, a different cache entry


def test_exported_backbone_evaluates_like_the_checkpoint(run, tmp_path):
    from tfssl.export import export_run
    export_run(run, str(tmp_path / "exp"), formats=("keras", "onnx"))
    ckpt = protocols.features(protocols.open_subject(run), "test")[0]
    for path in (str(tmp_path / "exp"), str(tmp_path / "exp" / "backbone.onnx")):
        subject = protocols.open_subject(run, backbone=path)
        np.testing.assert_allclose(protocols.features(subject, "test")[0], ckpt, atol=1e-4, rtol=1e-4)
        protocols.record(subject, "knn", protocols.run_knn(subject))
    evals = _summary(run)["eval"]["knn"]
    assert {"backbone:exp", "backbone:backbone.onnx"} <= set(evals)
    with pytest.raises(protocols.EvalError, match="needs a Keras backbone"):
        protocols.run_semi(protocols.open_subject(run, backbone=str(tmp_path / "exp" / "backbone.onnx")))


def test_linear_equals_library_probe_on_the_same_features(run):
    subject = protocols.open_subject(run, overrides=["eval.epochs=3"])
    got = protocols.run_linear(subject)
    ref = linear_probe(*protocols.features(subject, "train"), *protocols.features(subject, "test"), 10, "small",
                       epochs=3, val_fraction=0.1, seed=0)
    assert got["top1"] == ref["top1"] and got["val_top1"] == ref["val_top1"] and len(got["val_top1"]) == 3
    assert got["settings"]["epochs"] == 3 and got["num_val"] > 0
    aug = protocols.run_linear(protocols.open_subject(run, overrides=["eval.epochs=1", "eval.linear_augment=true"]))
    assert aug["settings"]["augmented"] and 0 <= aug["top1"] <= aug["top5"] <= 1


@pytest.mark.slow
def test_semi_fractions_and_cli_report(run, capsys):
    sets = ["--set", "eval.epochs=1", "--set", "eval.semi_fractions=[0.1]", "--set", "eval.semi_batch_size=32"]
    assert cli.main(["eval", "semi", "--workdir", run] + sets) == 0
    assert cli.main(["eval", "semi", "--workdir", run, "--baseline", "pixels"] + sets) == 0
    got = _summary(run)["eval"]["semi"]
    labels = np.concatenate([b["label"].numpy() for b in protocols.open_subject(run).source.train.batch(512)])
    expected = sum(max(1, round(0.1 * np.sum(labels == c))) for c in np.unique(labels))
    for subject in ("checkpoint", "pixels"):
        r = got[subject]["10%"]
        assert r["labelled"] == expected and r["epochs"] == 1 and 0 <= r["top1"] <= r["top5"] <= 1
    assert cli.main(["eval", "semi", "--workdir", run, "--set", "eval.pseudo_label=true"] + sets) == 0
    both = _summary(run)["eval"]["semi"]["checkpoint"]                  # merged: the plain result is kept
    assert both["10%"]["labelled"] == expected and "first_round" not in both["10%"]
    pseudo = both["10% + pseudo-labels"]
    assert pseudo["unlabelled"] == 256 - expected and pseudo["labelled"] == expected + pseudo["pseudo_labelled"]
    assert protocols.semi_epochs(0.01) == 60 and protocols.semi_epochs(0.1) == 30 and protocols.semi_epochs(0.1, 2) == 2
    capsys.readouterr()
    assert cli.main(["eval", "report", "--workdir", run]) == 0
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if "checkpoint" in line and "pixels" in line]
    assert header and "online probe top-1" in out and "fine-tuned on 10% labels top-1 / top-5" in out


def test_plot_writes_pngs_tensorboard_images_and_projector(run):
    subject = protocols.open_subject(run, overrides=["eval.plot_limit=100"])
    r = protocols.record(subject, "plot", protocols.run_plot(subject))
    for key in ("tsne", "retrieval"):
        with Image.open(r[key]) as im:
            assert im.format == "PNG" and im.size[0] > 100
    import tensorflow as tf
    tags = set()
    for f in glob.glob(os.path.join(r["tensorboard"], "events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(f):
            tags |= {v.tag for v in event.summary.value}
    assert set(r["tensorboard_tags"]) <= tags and len(r["tensorboard_tags"]) == 2
    assert r["points"] == 100
    with open(r["projector"]["tensors"]) as f:
        assert len(f.read().strip().splitlines()) == 100
    assert _summary(run)["eval"]["plot"]["checkpoint"]["tsne"] == r["tsne"]


def test_eval_errors_are_one_clear_line(run, tmp_path, capsys):
    assert cli.main(["eval", "linear", "--workdir", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert cli.main(["eval", "knn", "--workdir", run, "--checkpoint", str(tmp_path / "nope.h5")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli.main(["eval", "knn", "--workdir", run, "--backbone", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["eval", "report", "--workdir", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "knn", "--workdir", run, "--baseline", "pixels", "--checkpoint", "x"])
    with pytest.raises(protocols.EvalError, match="at most one"):
        protocols.open_subject(run, checkpoint="x", baseline="pixels")
