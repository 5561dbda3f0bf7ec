"""Mixed precision (``train.precision``): layers compute in float16/bfloat16 while the losses, temperatures, softmax,
queues and the probe stay float32; float16 uses Keras's dynamic loss scaling; the global policy is restored after a
run."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from helpers import build as _build, case_views as _views
from tfssl import config
from tfssl.train import pretrain


@pytest.fixture
def policy():
    def use(name):
        keras.mixed_precision.set_dtype_policy(name)
    yield use
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize("name,params,precision", [
    ("ressl", dict(queue_size=32), "mixed_bfloat16"), ("ressl", dict(queue_size=32), "mixed_float16"),
    ("wcl", {}, "mixed_bfloat16"), ("csml", dict(queue_size=32, levels=[3, 4]), "mixed_float16")], ids=str)
def test_mixed_step_keeps_losses_and_queues_in_float32(name, params, precision, policy):
    keras.utils.set_random_seed(0)
    cfg = tiny_config(name, **params)
    views, labels = _views(cfg)
    reference = _build(cfg, tf.distribute.get_strategy())
    loss32, _, _ = reference.loss_and_gradients(views)
    policy(precision)
    model = _build(cfg, tf.distribute.get_strategy(), reference.get_weights())
    assert model.backbone.layers[2].compute_dtype == precision.split("_")[1]
    loss, out, grads = model.loss_and_gradients(views)
    assert loss.dtype == tf.float32 and out["z"].dtype == tf.float32
    assert all(v.dtype == tf.float32 for v in model.student_variables)          # float32 master weights
    assert float(loss) == pytest.approx(float(loss32), rel=0.05)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
    logs = model.train_step({"views": views, "label": labels})
    assert np.isfinite(float(logs["loss"])) and np.isfinite(float(logs["probe_loss"]))
    if model.uses_teacher:
        assert model.queue.dtype == tf.float32 and np.isfinite(model.queue.numpy()).all()
        assert int(model.queue_ptr.numpy()) == len(labels)


@pytest.mark.slow      # pretraining runs (seconds): the full tier
@pytest.mark.parametrize("precision", ["mixed_bfloat16", "auto"])
def test_pretrain_in_mixed_precision_records_the_choice_and_restores_the_policy(tmp_path, precision):
    """train.precision=auto resolves through the device plan (mixed_bfloat16 on a CPU with bf16 arithmetic, float32
    elsewhere): the log's train step line and summary.json say what was chosen and why; the process's policy is
    float32 again afterwards."""
    from tfssl import devices
    cfg = config.load("ressl_fashion_mnist", ["data.limit=128", "data.test_limit=64", "train.epochs=1",
                                              "train.batch_size=64", "train.verbose=0", "train.jit_compile=false",
                                              "model.projector_hidden=32", "method.queue_size=128",
                                              "eval.knn_train_limit=128", f"train.precision={precision}",
                                              "model.backbone=tiny"])
    lines = []
    summary = pretrain(cfg, str(tmp_path), log=lines.append)
    assert np.isfinite(summary["final_loss"]) and summary["knn_top1"] is not None
    assert keras.mixed_precision.dtype_policy().name == "float32"
    expected = devices.plan(devices.detect(), False, "auto", precision)
    recorded = json.load(open(tmp_path / "summary.json"))["train_plan"]
    assert recorded["precision"] == expected.precision and recorded["reasons"]["precision"] == \
        expected.reasons["precision"]
    assert precision != "auto" or recorded["reasons"]["precision"].startswith("auto: CPU")
    step_line = next(line for line in lines if line.startswith("train step:"))
    assert f"{expected.precision} ({expected.reasons['precision']})" in step_line
