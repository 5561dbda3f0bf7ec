"""Preemption-safe resume (tfssl/resume.py): a run killed with SIGKILL mid-epoch and restarted with the same command
ends with the same weights as an uninterrupted run; corrupt backups are reported and skipped."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import h5_weights, tiny_config
from tfssl import methods, resume
from tfssl.optim import build_optimizer

RUN = ["data.limit=256", "data.test_limit=128", "train.epochs=3", "train.batch_size=64", "train.verbose=0",
       "model.backbone=tiny", "model.projector_hidden=32", "eval.knn_train_limit=256", "train.deterministic=true",
       "eval.baselines=[]"]     # the closing baselines table (tested in test_train) adds ~5 s to every run here
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(recipe, workdir, sets):
    return [sys.executable, "-m", "tfssl", "pretrain", recipe, "--workdir", str(workdir)] + sum(
        (["--set", s] for s in RUN + sets), [])


def _run(recipe, workdir, sets, capsys):
    """The same command in this process (``tfssl.cli.main``): bit-identical to a fresh process (the recipe's data,
    views and deterministic ops depend only on the seed), without the ~8 s of starting Python and TensorFlow.
    Returns (exit code, stdout)."""
    from tfssl import cli
    capsys.readouterr()
    code = cli.main(_command(recipe, workdir, sets)[3:])
    return code, capsys.readouterr().out


class _KeepEvery(resume.Backup):
    """A backup that keeps every epoch (the job keeps the two newest)."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **dict(kwargs, keep=100))


@pytest.mark.slow
@pytest.mark.parametrize("recipe,sets,kill", [
    ("ressl_fashion_mnist", ["method.queue_size=256"], "sigkill"),
    ("mocov2_fashion_mnist", ["method.queue_size=256", "augment.on_device=true"], "sigkill"),   # views in train_step
    # the neighbour table (mined at epoch 0, used in epoch 1) and the mining schedule restored: the uninterrupted
    # run is rewound to its epoch-1 backup (the files a kill in epoch 2 leaves) instead of killing a third process,
    # which cost ~40 s and proved nothing the two SIGKILL cases do not
    ("csml_fashion_mnist", ["method.queue_size=256", "method.mine_every=2"], "rewind"),
], ids=["ressl", "mocov2-on-device", "csml"])
def test_sigkill_mid_epoch_then_same_command_equals_uninterrupted(recipe, sets, kill, tmp_path, capsys,
                                                                  monkeypatch):
    """The uninterrupted run and the resumed run are the command run in this process (bit-identical to a fresh
    process: the same weights to 0.0, checked when this was written); the killed run is a real process, SIGKILLed in
    the middle of epoch 2."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    with monkeypatch.context() as patch:
        if kill == "rewind":
            patch.setattr(resume, "Backup", _KeepEvery)
        assert _run(recipe, whole, sets, capsys)[0] == 0
    if kill == "sigkill":
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
        proc = subprocess.Popen(_command(recipe, killed, sets), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        first = killed / "backup" / "epoch-0001" / "state.json"
        deadline = time.time() + 300
        while not first.exists():                   # the epoch-1 backup is renamed into place complete
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)            # now, in the middle of epoch 2
        assert proc.wait() == -signal.SIGKILL
    else:
        shutil.copytree(whole, killed)
        for name in ("summary.json", "checkpoints", "backup/epoch-0002", "backup/epoch-0003"):
            path = killed / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert not (killed / "summary.json").exists()
    done = sorted(os.listdir(killed / "backup"))
    assert done[0] == "epoch-0001"
    code, out = _run(recipe, killed, sets, capsys)
    assert code == 0, out[-3000:]
    assert f"resume: continuing from {killed / 'backup' / done[-1]}" in out
    a, b = h5_weights(whole / "checkpoints" / "last.weights.h5"), h5_weights(killed / "checkpoints" / "last.weights.h5")
    assert a.keys() == b.keys() and len(a) > 50
    for name in a:                              # weights, teacher, queues, optimizer slots, probe, BN statistics
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)
    sa, sb = json.load(open(whole / "summary.json")), json.load(open(killed / "summary.json"))
    assert len(sb["history"]["loss"]) == 3 and sb["resumed_from_epoch"] == int(done[-1][-4:])
    np.testing.assert_allclose(sb["history"]["loss"], sa["history"]["loss"], rtol=1e-6)
    if recipe.startswith("csml"):               # epochs 0 and 2 mined, once each, over the two attempts
        assert [m["epoch"] for m in sb["neighbour_label_agreement"]] == [0, 2]
    if recipe.startswith("ressl"):
        # the same command once more: nothing to do, nothing overwritten
        code, out = _run(recipe, killed, sets, capsys)
        assert code == 0 and "all 3 epochs of this run are done" in out
        assert json.load(open(killed / "summary.json")) == sb
        # the control: the equality is not vacuous — the last epoch alone moves the state 1000× beyond the
        # tolerance, so a resume that lost or replayed part of it would end elsewhere (the former control, a run
        # with another data seed, cost ~20 s more)
        c = h5_weights(whole / "backup" / "epoch-0002" / "state.weights.h5")
        assert c.keys() == a.keys()
        assert max(float(np.max(np.abs(a[n].astype(float) - c[n].astype(float)))) for n in a if a[n].size) > 1e-3


def _tiny_model():
    cfg = tiny_config("mocov2", queue_size=64)
    model = methods.build(cfg, 10, (0.5,), (0.5,), 10)
    model.compile(build_optimizer(cfg.train, 10, 5))
    return cfg, model


def test_corrupt_newest_backup_is_reported_and_the_previous_one_used(tmp_path):
    import tensorflow as tf
    cfg, model = _tiny_model()
    table = tf.Variable(np.zeros((6, 2), np.int32))
    logs = []
    backup = resume.Backup(str(tmp_path), cfg.to_dict(), {"table": table}, lambda: {"n": 1}, log=logs.append)
    backup.set_model(model)
    first = [w.numpy().copy() for w in model.weights]
    table.assign(np.ones((6, 2), np.int32))
    backup.on_epoch_end(0, {"loss": 2.0})
    for w in model.weights:
        if w.dtype == "float32":
            w.assign(w + 1.0)
    backup.on_epoch_end(1, {"loss": 1.0})
    os.makedirs(tmp_path / ".tmp-epoch-0003")    # a kill while writing epoch 3: never looked at
    assert sorted(os.listdir(tmp_path)) == [".tmp-epoch-0003", "epoch-0001", "epoch-0002"]
    with open(tmp_path / "epoch-0002" / "state.weights.h5", "r+b") as f:
        f.truncate(1000)                         # a partial file
    table.assign(np.zeros((6, 2), np.int32))
    fresh = resume.Backup(str(tmp_path), cfg.to_dict(), {"table": table}, log=logs.append)
    epoch, records = fresh.restore(model)
    assert epoch == 1 and records == {"n": 1} and fresh.history == {"loss": [2.0]}
    assert any("epoch-0002 is unusable" in line and "checksum" in line for line in logs)
    for w, value in zip(model.weights, first):
        np.testing.assert_array_equal(w.numpy(), value)
    np.testing.assert_array_equal(table.numpy(), np.ones((6, 2)))
    with open(tmp_path / "epoch-0001" / "host.npz", "r+b") as f:
        f.truncate(10)
    with pytest.raises(resume.ResumeError, match="delete that directory"):
        fresh.restore(model)


def test_backup_of_another_recipe_is_refused_and_old_backups_pruned(tmp_path):
    cfg, model = _tiny_model()
    backup = resume.Backup(str(tmp_path), cfg.to_dict(), log=lambda *_: None)
    backup.set_model(model)
    for epoch in range(4):
        backup.on_epoch_end(epoch, {})
    assert sorted(os.listdir(tmp_path)) == ["epoch-0003", "epoch-0004"]    # the two newest are kept
    other = cfg.to_dict()
    other["train"]["lr"] = 1.0
    with pytest.raises(resume.ResumeError, match="different recipe"):
        resume.Backup(str(tmp_path), other).restore(model)
    devices = cfg.to_dict()
    devices["distribute"]["strategy"] = "mirrored"               # same run on other devices: allowed
    assert resume.Backup(str(tmp_path), devices, log=lambda *_: None).restore(model)[0] == 4
    assert resume.Backup(str(tmp_path / "none"), cfg.to_dict()).restore(model) == (0, {})
