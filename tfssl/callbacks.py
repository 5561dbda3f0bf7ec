"""Keras callbacks of the pretraining job: kNN monitor, atomic checkpoints, throughput timer, non-finite guard."""
from __future__ import annotations

import math
import os
import time

import keras
import numpy as np

from tfssl.eval.knn import embed, knn_accuracy


class Throughput(keras.callbacks.Callback):
    """Measures training time only (put it first: later callbacks' evaluation time is not counted). ``offset``: the
    training seconds of earlier attempts of a resumed run; ``train_seconds`` in the logs counts them too."""

    def __init__(self, batch_size, offset=0.0):
        super().__init__()
        self.batch_size, self.seconds, self.steps, self.offset = batch_size, 0.0, 0, float(offset)

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_epoch_begin(self, epoch, logs=None):
        self._t0, self._steps0 = time.perf_counter(), self.steps

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._t0
        self.seconds += seconds
        if logs is not None:
            logs["images_per_second"] = self.images_per_second          # the run so far
            logs["epoch_images_per_second"] = (self.steps - self._steps0) * self.batch_size / max(seconds, 1e-9)
            logs["train_seconds"] = self.total_seconds

    @property
    def images_per_second(self):
        return self.steps * self.batch_size / self.seconds if self.seconds else 0.0

    @property
    def total_seconds(self):
        """Training seconds of the whole run, earlier attempts included."""
        return self.offset + self.seconds


class TimeBudget(keras.callbacks.Callback):
    """``train.max_minutes``: stop at the end of the epoch in which the run's training time (``timer``, a
    :class:`Throughput`) reaches ``minutes``. The schedule keeps the recipe's epochs (its lr is then not annealed
    to zero); ``stopped`` tells whether the budget ended the run."""

    def __init__(self, minutes, timer, log=print):
        super().__init__()
        self.minutes, self.timer, self.log, self.stopped = float(minutes), timer, log, False

    def on_epoch_end(self, epoch, logs=None):
        if self.timer.total_seconds >= 60.0 * self.minutes:
            self.log(f"train.max_minutes={self.minutes:g}: stopping after epoch {epoch + 1} "
                     f"({self.timer.total_seconds / 60:.1f} training minutes)")
            self.stopped = True
            self.model.stop_training = True


class KNNMonitor(keras.callbacks.Callback):
    """Weighted kNN (k, τ) of the backbone's features: bank = training images, queries = the held-out split.

    Runs every ``every`` epochs (0: only after the last) and adds ``knn_top1``/``knn_top5`` to the epoch logs, so
    TensorBoard and the history record them, with ``knn_epoch`` and (given the job's ``timer``) ``knn_train_seconds``
    beside them: the points of the accuracy-against-training-time curve.
    """

    def __init__(self, bank_ds, test_ds, num_classes, k=200, temperature=0.1, every=1, epochs=1, timer=None):
        super().__init__()
        self.bank_ds, self.test_ds, self.num_classes = bank_ds, test_ds, num_classes
        self.k, self.temperature, self.every, self.epochs, self.timer = k, temperature, every, epochs, timer
        self.last = {}

    def evaluate(self):
        bank, bank_y = embed(self.model.backbone, self.bank_ds)
        test, test_y = embed(self.model.backbone, self.test_ds)
        keep = bank_y >= 0
        self.last = knn_accuracy(bank[keep], bank_y[keep], test, test_y, self.num_classes, self.k, self.temperature)
        return self.last

    def on_epoch_end(self, epoch, logs=None):
        final = epoch + 1 == self.epochs
        stopping = self.model is not None and getattr(self.model, "stop_training", False)
        if final or stopping or (self.every and (epoch + 1) % self.every == 0):
            result = self.evaluate()
            if logs is not None:
                logs["knn_top1"], logs["knn_top5"], logs["knn_epoch"] = result["top1"], result["top5"], epoch + 1
                if self.timer is not None:
                    logs["knn_train_seconds"] = self.timer.total_seconds


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves all weights (student, teacher, queues, probe) each epoch to ``dir/last.weights.h5`` via temp + rename."""

    def __init__(self, directory):
        super().__init__()
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    @property
    def path(self):
        return os.path.join(self.directory, "last.weights.h5")

    def on_epoch_end(self, epoch, logs=None):
        tmp = os.path.join(self.directory, f".tmp-epoch{epoch + 1}.weights.h5")
        self.model.save_weights(tmp)
        os.replace(tmp, self.path)


class EpochVariable(keras.callbacks.Callback):
    """Sets the host variable the input pipeline reads (:func:`tfssl.pipeline.epoch_pipeline`) to each epoch's index,
    before ``model.fit`` opens that epoch's iterator."""

    def __init__(self, variable):
        super().__init__()
        self.variable = variable

    def on_epoch_begin(self, epoch, logs=None):
        self.variable.assign(epoch)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/Inf loss."""


class StopOnNonFinite(keras.callbacks.Callback):
    """``train.on_nan: stop``: raises :class:`NonFiniteLoss` naming the epoch and step as soon as the loss is NaN or
    infinite; the backup and checkpoint of the last finished epoch stay as they were. ``skip=True``
    (``train.on_nan: skip``, the model skips such steps): reports the skipped steps of each epoch and stops only
    when a whole epoch was skipped (training has diverged)."""

    def __init__(self, skip=False, log=print):
        super().__init__()
        self.skip, self.log = skip, log

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._steps = epoch, 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps = batch + 1
        loss = (logs or {}).get("loss")
        if not self.skip and loss is not None and not math.isfinite(float(np.asarray(loss))):
            raise NonFiniteLoss(f"loss became {float(np.asarray(loss))} at epoch {self._epoch + 1}, step {batch + 1};"
                                " the checkpoint and backup of the last finished epoch are kept. Lower train.lr, "
                                "check the data or raise the temperatures, or set train.on_nan=skip")

    def on_epoch_end(self, epoch, logs=None):
        skipped = int(float(np.asarray((logs or {}).get("skipped", 0))))
        if not self.skip or not skipped:
            return
        self.log(f"epoch {epoch + 1}: skipped {skipped} of {self._steps} steps with a non-finite loss (train.on_nan=skip)")
        if skipped >= self._steps:
            raise NonFiniteLoss(f"every step of epoch {epoch + 1} had a non-finite loss: training has diverged; the "
                                "backup of the last good epoch is kept. Lower train.lr or check the data")
