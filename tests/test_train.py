"""End to end: each Fashion-MNIST recipe trains briefly and writes checkpoint, TensorBoard events, summary.json;
the CLI's preview, eval knn and error paths."""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from tfssl import cli, config
from tfssl.train import pretrain

QUICK = ["data.limit=384", "data.test_limit=256", "train.epochs=1", "train.batch_size=64", "train.verbose=0",
         "train.jit_compile=false", "model.projector_hidden=64", "eval.knn_train_limit=384",
         "model.backbone=tiny"]   # the recipes' own `small` (4x the width): test_backbones; here the recipe's path


@pytest.mark.slow
@pytest.mark.parametrize("recipe,xla", [("ressl_fashion_mnist", True), ("simclr_fashion_mnist", False),
                                        ("mocov2_fashion_mnist", False), ("wcl_fashion_mnist", False),
                                        ("csml_fashion_mnist", False)])
def test_recipe_short_run(recipe, xla, tmp_path):
    """Each recipe trains to the end with its views made on the device (the GPU/TPU setup). ReSSL's runs inside
    the XLA step through ``pretrain``; the others run the same on-device views in the TF graph, because their whole
    step (views made on the device included) compiles with XLA and equals the graph step in test_xla — compiling
    it again here cost the suite ~2 minutes and proved nothing more."""
    quick = [o for o in QUICK if o != "train.jit_compile=false"] + ["augment.on_device=true",
                                                                     f"train.jit_compile={str(xla).lower()}"]
    cfg = config.load(recipe, quick + (["method.queue_size=512"] if recipe.split("_")[0] in ("ressl", "mocov2", "csml")
                                       else []))
    lines = []
    summary = pretrain(cfg, str(tmp_path), log=lines.append)
    assert any(line.startswith("train step: XLA" if xla else "train step: TF graph") for line in lines), lines
    assert summary["train_plan"]["jit"] == xla and np.isfinite(summary["final_loss"])
    assert summary["steps"] == 384 // 64 and summary["epochs"] == 1 and summary["replicas"] == 1
    for key in ("knn_top1", "probe_top1", "images_per_second", "wall_seconds"):
        assert summary[key] is not None and summary[key] >= 0
    assert 0.1 < summary["knn_top1"] <= 1.0          # a tiny random-ish net on Fashion-MNIST beats chance (10%)
    on_disk = json.load(open(tmp_path / "summary.json"))
    assert on_disk["knn_top1"] == summary["knn_top1"]
    assert os.path.getsize(tmp_path / "checkpoints" / "last.weights.h5") > 0
    assert not glob.glob(str(tmp_path / "checkpoints" / ".tmp*"))
    assert glob.glob(str(tmp_path / "tensorboard" / "**" / "events.out.tfevents*"), recursive=True)
    assert config.load(str(tmp_path / "config.yaml")).to_dict() == cfg.to_dict()
    if recipe.startswith("wcl"):                      # the weak-label metrics reach the summary's history
        assert all(0 <= p <= 1 for p in summary["history"]["weak_precision"])
        assert summary["history"]["weak_components"][0] >= 1


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml"))),
                         ids=os.path.basename)
def test_every_shipped_recipe_loads_and_builds_its_views(path):
    from tfssl import methods
    cfg = config.load(path)
    assert os.path.basename(path).startswith(type(cfg.method).method_name + "_")
    views = methods.views_for(cfg, steps_per_epoch=10)
    assert views.count >= 2 and views.large[0].layers[0].size == cfg.augment.size


@pytest.mark.slow
def test_cli_pretrain_on_two_replicas_prints_its_baselines_then_eval_knn(tmp_path, capsys):
    """`tfssl pretrain` (2 replicas) with eval.baselines=[knn, linear]: its closing table shows the trained
    backbone beside a random-init backbone and raw pixels, each figure the one recorded in summary.json; run again,
    nothing is recomputed. Then `tfssl eval knn` on the run."""
    workdir = str(tmp_path / "run")
    sets = sum((["--set", s] for s in QUICK + ["method.queue_size=512", "distribute.strategy=mirrored",
                                               "eval.baselines=[knn,linear]", "eval.epochs=2"]), [])
    assert cli.main(["pretrain", "--workdir", workdir] + sets) == 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "online probe" in out
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["replicas"] == 2 and summary["strategy"] == "MirroredStrategy"
    table = out[out.index("beside its baselines"):].splitlines()
    assert "this backbone" in table[-4] and "random init" in table[-4] and "raw pixels" in table[-4]
    for line, protocol, key in ((table[-3], "knn", "weighted"), (table[-1], "linear", None)):
        figures = [summary["eval"][protocol][s] for s in ("checkpoint", "random_init", "pixels")]
        figures = [f[key]["top1"] if key else f["top1"] for f in figures]
        assert line.split()[-3:] == [f"{100 * f:.2f}%" for f in figures], (line, figures)
    assert out.count(" done in ") == 6                            # 2 protocols × 3 subjects
    assert cli.main(["pretrain", "--workdir", workdir] + sets) == 0   # finished run: the table, nothing rerun
    again = capsys.readouterr().out
    assert " done in " not in again and table[-1] in again
    assert cli.main(["eval", "knn", "--workdir", workdir, "--set", "data.limit=384",
                     "--set", "data.test_limit=256"]) == 0
    again = json.load(open(os.path.join(workdir, "summary.json")))["eval"]["knn"]["checkpoint"]
    assert 0 <= again["weighted"]["top1"] <= again["weighted"]["top5"] <= 1


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert cli.main(["pretrain", "--workdir", str(tmp_path), "--set", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.epoch'" in err and "did you mean 'epochs'" in err
    assert cli.main(["pretrain", "no_such_recipe", "--workdir", str(tmp_path)]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert cli.main(["pretrain", "--workdir", str(tmp_path), "--set", "data.path=" + str(tmp_path / "nope"),
                     "--set", "data.name=folder"]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert cli.main(["pretrain", "--workdir", str(tmp_path), "--set", "data.limit=10"]) == 2
    assert "larger than the 10 training images" in capsys.readouterr().err
    assert cli.main(["pretrain", "--workdir", str(tmp_path), "--set", "distribute.strategy=multi_worker"]) == 2
    assert "needs the TF_CONFIG environment variable" in capsys.readouterr().err
    assert cli.main(["pretrain", "--workdir", str(tmp_path), "--set", "train.deterministic=true",
                     "--set", "train.jit_compile=true"]) == 2
    assert "Keras compiles no XLA step under TensorFlow's deterministic ops" in capsys.readouterr().err
    assert not os.listdir(tmp_path)                           # failed runs leave nothing behind
    assert cli.main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert cli.main(["zoo", "verify", str(tmp_path / "missing.onnx"), "--manifest", str(tmp_path / "z.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


@pytest.mark.slow      # a pretraining run (seconds): the full tier
def test_a_deterministic_run_leaves_the_process_as_it_found_it(tmp_path):
    """train.deterministic turns TensorFlow's deterministic ops on for the run only: afterwards Keras compiles
    XLA steps again in the same process (the flag is process-wide and made later XLA runs silently graph runs)."""
    from tensorflow.python.framework import config as tf_config
    cfg = config.load("ressl_fashion_mnist", QUICK[:3] + ["train.batch_size=128", "train.verbose=0",
                                                          "train.deterministic=true", "model.projector_hidden=32",
                                                          "method.queue_size=256", "eval.knn_train_limit=128"])
    lines = []
    pretrain(cfg, str(tmp_path), log=lines.append)
    assert any("train.deterministic" in line for line in lines if line.startswith("train step:"))
    assert not tf_config.is_op_determinism_enabled()


def test_preview_writes_a_real_png(tmp_path):
    out = str(tmp_path / "grid.png")
    assert cli.main(["preview", "ressl_fashion_mnist", "--out", out, "--count", "4"]) == 0
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size == (3 * 64 + 2 * 4, 4 * 64)
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10                                  # not a blank canvas
    original, view = pixels[:, :64], pixels[:, 68:132]
    assert np.abs(original - view).mean() > 1                 # views differ from the originals


@pytest.mark.slow      # a pretraining run (seconds): the full tier
def test_train_step_traced_once_over_epochs_of_the_epoch_pipeline():
    """Pretraining reads one endless iterator of the epoch pipeline over all epochs (bench/NOTES.md §7m: opening one
    per epoch cost 0.2-0.6 s each); the compiled step must not be traced again (issue #9: no retracing). The Python
    ``train_step`` body runs once per trace, so counting its calls counts traces."""
    import tensorflow as tf
    from conftest import tiny_config
    from tfssl import callbacks, data, methods
    from tfssl.optim import SGD
    cfg = tiny_config("mocov2", queue_size=64)
    source = data.from_numpy(np.random.default_rng(0).integers(0, 255, (48, 32, 32, 1), dtype=np.uint8),
                             np.arange(48) % 4)
    views = methods.views_for(cfg, 3)
    model = methods.build(cfg, 4, total_steps=9, steps_per_epoch=3)
    model.compile(SGD(0.1, momentum=0.9), jit_compile=False)
    epoch = tf.Variable(0, dtype=tf.int64)
    pipeline = model.make_pipeline(source, views, cfg, 3, epoch)
    assert int(pipeline.cardinality()) == tf.data.INFINITE_CARDINALITY   # one iterator for the whole run
    traces = []
    step = model.train_step
    model.train_step = lambda batch: (traces.append(1), step(batch))[1]
    history = model.fit(pipeline, epochs=3, steps_per_epoch=3, callbacks=[callbacks.EpochVariable(epoch)],
                        verbose=0).history
    assert len(history["loss"]) == 3 and int(model.optimizer.iterations.numpy()) == 9
    assert len(traces) == 1
