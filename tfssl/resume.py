"""Preemption-safe resume: the whole training state is backed up at every epoch end and restored on restart.

A backup ``RUN/backup/epoch-NNNN/`` holds ``state.weights.h5`` (every model variable: student, teacher, queues and
their pointers, momentum, probe, BatchNorm statistics, the optimizers' slots and step counters), ``host.npz`` (host
variables of the job, e.g. CsMl's neighbour table) and ``state.json`` (epoch, the recipe, history so far, the job's
own records, SHA-256 of both files). It is written into ``.tmp-…`` and renamed, so a kill leaves either a complete
backup or none; the two newest are kept. Restoring takes the newest backup that verifies and loads, reporting any
it skips. Data order and views depend only on (seed, step) (:func:`tfssl.pipeline.epoch_pipeline`), so a resumed run
continues exactly as the uninterrupted one would have.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import keras
import numpy as np

from tfssl.export import sha256_file as _sha256

# may change between restarts: log verbosity, and the devices (same global batch: the same run on other hardware)
IGNORED_KEYS = (("train", "verbose"), ("distribute", None))


class ResumeError(RuntimeError):
    """The backup cannot be used (none valid, or it belongs to another recipe)."""


def _comparable(cfg_dict):
    d = json.loads(json.dumps(cfg_dict, default=str))
    for section, key in IGNORED_KEYS:
        if key is None:
            d.pop(section, None)
        else:
            d.get(section, {}).pop(key, None)
    return d


class Backup(keras.callbacks.Callback):
    """Backs up the run at every epoch end (``write=True``: the chief) and restores it (:meth:`restore`).

    ``host_variables``: name → ``tf.Variable`` kept outside the model (saved in ``host.npz``). ``job_state``: a
    callable returning JSON-able records saved with each backup (e.g. the mining history). ``history`` merges the
    epochs of every attempt, so the final summary covers the whole run.
    """

    def __init__(self, directory, cfg_dict, host_variables=None, job_state=None, write=True, keep=2, log=print):
        super().__init__()
        self.directory, self.cfg = directory, cfg_dict
        self.host_variables, self.job_state = dict(host_variables or {}), job_state or (lambda: {})
        self.write, self.keep, self.log = write, keep, log
        self.history, self.restored_epoch = {}, 0

    def _backups(self):
        return sorted(glob.glob(os.path.join(self.directory, "epoch-*")), reverse=True)

    def restore(self, model):
        """Load the newest usable backup into ``model`` (compiled); returns (epoch to start from, job records)."""
        found = self._backups()
        for path in found:
            try:
                state = self._load(path, model)
            except ResumeError:
                raise
            except Exception as e:                       # corrupt, partial or unreadable: report and go older
                self.log(f"resume: backup {path} is unusable ({type(e).__name__}: {str(e)[:200]}); trying an older one")
                continue
            self.restored_epoch, self.history = state["epoch"], state["history"]
            self.log(f"resume: continuing from {path} (epoch {state['epoch']} done)")
            return state["epoch"], state.get("job", {})
        if found:
            raise ResumeError(f"no usable backup in {self.directory} (all {len(found)} are corrupt); delete that "
                              f"directory to start the run from scratch")
        return 0, {}

    def _load(self, path, model):
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        if _comparable(state["config"]) != _comparable(self.cfg):
            raise ResumeError(f"the backup in {self.directory} belongs to a different recipe; use a new --workdir "
                              f"or delete {self.directory} to start again")
        for name in ("state.weights.h5", "host.npz"):
            if _sha256(os.path.join(path, name)) != state["sha256"][name]:
                raise ValueError(f"{name} does not match its checksum (partial or corrupt file)")
        with np.load(os.path.join(path, "host.npz")) as host:
            missing = set(self.host_variables) - set(host.files)
            if missing:
                raise ValueError(f"host variables {sorted(missing)} missing")
            values = {k: host[k] for k in self.host_variables}
        model.load_weights(os.path.join(path, "state.weights.h5"))
        for name, value in values.items():
            self.host_variables[name].assign(value)
        return state

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(np.asarray(value)))
        if not self.write:
            return
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, f"epoch-{epoch + 1:04d}")
        tmp = os.path.join(self.directory, f".tmp-epoch-{epoch + 1:04d}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.model.save_weights(os.path.join(tmp, "state.weights.h5"))
        np.savez(os.path.join(tmp, "host.npz"), **{k: v.numpy() for k, v in self.host_variables.items()})
        state = {"epoch": epoch + 1, "config": self.cfg, "history": self.history, "job": self.job_state(),
                 "sha256": {n: _sha256(os.path.join(tmp, n)) for n in ("state.weights.h5", "host.npz")}}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, default=float)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self._backups()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
