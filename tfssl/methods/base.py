"""The base class every method extends: backbone, projector, EMA teacher, queues, online probe, metrics.

A step (``train_step``) runs in this order, which is the order of the official MoCo/ReSSL code:

1. views: from the pipeline (``data["views"]``) or made here on the device from ``data["image"]``;
2. EMA update of the teacher's trainable weights (θt ← m·θt + (1−m)·θs), m from the momentum schedule;
3. ``teacher_outputs(views)``: the teacher forward, outside the gradient tape. The teacher's BatchNorm uses batch
   statistics (the PyTorch teacher runs in train mode) and keeps its own moving statistics (not averaged);
4. ``student_loss(views, teacher)`` inside the tape: returns this replica's *share* of the global mean loss;
5. optimizer step on the student variables only (Keras sums the replicas' gradients);
6. enqueue the *gathered* teacher keys into each queue (identical on every replica), then the online probe step.

A method file defines ``Params`` (its config dataclass), ``view_recipes`` and the two hooks; nothing else.
"""
from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from tfssl import data, distribute
from tfssl.backbones import build_backbone, build_mlp, feature_dim
from tfssl.optim import SGD


def normalize(x):
    """L2-normalise rows (float32)."""
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=1)


class SSLMethod(keras.Model):
    """Shared machinery of a self-supervised method; subclasses implement :meth:`student_loss`."""

    method_name = "base"
    uses_teacher = False
    view_recipes = ("strong", "strong")
    warmup_view_recipes = None   # recipes of the first ``params.view_warmup_epochs`` epochs (a view schedule)
    metric_names = ()            # scalars a method returns in its outputs dict, averaged over replicas
    label_metric_names = ()      # scalars of :meth:`label_metrics` (need the monitoring labels)

    def __init__(self, params, model_cfg, num_classes=0, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, views=None,
                 total_steps=1, seed=0, steps_per_epoch=None, **kw):
        super().__init__(name=kw.pop("name", self.method_name), **kw)
        self.params, self.model_cfg, self.num_classes = params, model_cfg, num_classes
        self.total_steps, self.seed = max(1, int(total_steps)), seed
        self.steps_per_epoch = int(steps_per_epoch or self.total_steps)
        self.views = views
        self._bb_args = dict(name=model_cfg.backbone, cifar_stem=model_cfg.cifar_stem, width=model_cfg.width,
                             sync_bn=model_cfg.sync_bn, channels=channels, mean=mean, std=std)
        self.feature_dim = feature_dim(model_cfg.backbone, model_cfg.width)
        self.backbone = build_backbone(model_name="backbone", **self._bb_args)
        self.projector = self.make_projector("projector")
        self.probe = keras.layers.Dense(num_classes, name="probe") if num_classes else None
        if self.probe is not None:
            self.probe.build((None, self.feature_dim))
        if self.uses_teacher:
            self.teacher_backbone = build_backbone(model_name="teacher_backbone", **self._bb_args)
            self.teacher_projector = self.make_projector("teacher_projector")
            self.teacher_pairs = list(zip(self.teacher_backbone.trainable_weights + self.teacher_projector.trainable_weights,
                                          self.backbone.trainable_weights + self.projector.trainable_weights))
            self.teacher_backbone.set_weights(self.backbone.get_weights())
            self.teacher_projector.set_weights(self.projector.get_weights())
            self.momentum = self.add_weight(shape=(), initializer=keras.initializers.Constant(params.momentum),
                                            trainable=False, name="momentum")
        names = ("loss", "probe_loss", "probe_acc", "z_std") + tuple(self.metric_names) + tuple(self.label_metric_names)
        self.trackers = {n: keras.metrics.Mean(name=n) for n in names}
        self.built = True  # every variable exists now; Keras must not trace call() on view dicts to build

    # ----------------------------------------------------------------- pieces methods use
    def make_projector(self, name):
        """The projection head g (``model.projector_*``): Linear-[BN]-ReLU-Linear; built on the feature size."""
        c = self.model_cfg
        head = build_mlp([c.projector_hidden, c.projector_dim], batch_norm=c.projector_bn, sync_bn=c.sync_bn,
                         name=name)
        head.build((None, self.feature_dim))
        return head

    def student_embed(self, images):
        """(pooled features, L2-normalised projection) of the student, in training mode."""
        features = self.backbone(images, training=True)
        return features, normalize(self.projector(features, training=True))

    def teacher_embed(self, images):
        """L2-normalised teacher projection; BatchNorm on batch statistics (train mode), no gradient."""
        features = self.teacher_backbone(images, training=True)
        return tf.stop_gradient(normalize(self.teacher_projector(features, training=True)))

    def add_queue(self, name, size, dim):
        """A K×D memory queue of L2-normalised rows (random at start) and its write pointer."""
        rng = np.random.default_rng(self.seed + len(name))
        init = rng.standard_normal((size, dim)).astype("float32")
        init /= np.linalg.norm(init, axis=1, keepdims=True)
        queue = self.add_weight(shape=(size, dim), initializer=keras.initializers.Constant(init), trainable=False,
                                name=name)
        ptr = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False, name=name + "_ptr")
        return queue, ptr

    def enqueue(self, queue, ptr, keys):
        """Write the gathered keys of all replicas (global batch order: replica 0's rows first) at the pointer.

        Rows ``ptr … ptr+B−1`` (mod K) are replaced, i.e. the oldest entries; ``ptr ← (ptr + B) mod K``. Every
        replica computes the same gathered keys, so every replica holds the same queue.
        """
        keys = distribute.gather(tf.cast(keys, queue.dtype))
        n, size = tf.shape(keys)[0], queue.shape[0]
        idx = tf.math.floormod(ptr + tf.range(n), size)
        queue.assign(tf.tensor_scatter_nd_update(queue, idx[:, None], keys))
        ptr.assign(tf.math.floormod(ptr + n, size))

    def momentum_at(self, step):
        """Teacher momentum at ``step``: constant m0, or cosine m0 → 1 (BYOL): 1 − (1−m0)(cos(πk/K)+1)/2."""
        m0 = self.params.momentum
        if getattr(self.params, "momentum_schedule", "constant") == "constant":
            return tf.constant(m0, tf.float32)
        k = tf.minimum(tf.cast(step, tf.float32), float(self.total_steps))
        return 1.0 - (1.0 - m0) * (tf.cos(math.pi * k / self.total_steps) + 1.0) / 2.0

    def update_teacher(self, momentum=None):
        """θt ← m·θt + (1−m)·θs over the trainable weights (BatchNorm moving statistics are not averaged)."""
        m = self.momentum_at(self.optimizer.iterations) if momentum is None else momentum
        self.momentum.assign(m)
        for t, s in self.teacher_pairs:
            t.assign(m * t + (1.0 - m) * s)

    def global_batch(self, local):
        """Global batch size as float32 from a local tensor (equal splits over replicas)."""
        return tf.cast(tf.shape(local)[0] * distribute.num_replicas(), tf.float32)

    # ----------------------------------------------------------------- hooks
    @classmethod
    def small_crops(cls, params, size):
        """The method's own extra crops: (sizes, scale ranges) lists; none by default (``augment.small_crops``
        still adds generic multi-crop)."""
        return [], []

    def teacher_outputs(self, views):
        """Teacher forward (outside the tape). Returns a dict passed to :meth:`student_loss`."""
        return {}

    def student_loss(self, views, teacher):
        """Returns (this replica's share of the global mean loss, dict with 'features', 'z', 'enqueue', metrics)."""
        raise NotImplementedError

    def label_metrics(self, out, labels):
        """Monitoring metrics that use the true labels (never the loss): dict name → global scalar."""
        return {}

    # ----------------------------------------------------------------- hooks of the pretraining job (train.py)
    def make_pipeline(self, source, views, cfg):
        """The tf.data pipeline of pretraining: shuffled, batched, views made in the pipeline unless on the device."""
        return data.train_pipeline(source.train, cfg.train.batch_size, None if cfg.augment.on_device else views,
                                   seed=cfg.data.seed, shuffle_buffer=cfg.data.shuffle_buffer)

    def job_callbacks(self, source, cfg, log=print):
        """Extra Keras callbacks of pretraining (CsMl: neighbour mining)."""
        return []

    def job_summary(self):
        """Extra summary.json entries after pretraining."""
        return {}

    @property
    def student_variables(self):
        return self.backbone.trainable_variables + self.projector.trainable_variables

    # ----------------------------------------------------------------- Keras plumbing
    def call(self, images, training=False):
        """Pooled backbone features of images in [0, 1]."""
        return self.backbone(images, training=training)

    def compile(self, optimizer="sgd", probe_optimizer=None, **kw):
        """Compile with the student's optimizer and (optional) probe optimizer; builds both on their variables."""
        super().compile(optimizer=optimizer, **kw)
        if getattr(self.optimizer, "weight_decay", None) and not isinstance(self.optimizer, SGD):
            # Keras optimizers (e.g. Lamb) decay every variable: exempt BN parameters and biases, as tfssl's own do
            self.optimizer.exclude_from_weight_decay(var_list=[v for v in self.student_variables if len(v.shape) <= 1])
        self.optimizer.build(self.student_variables)
        self.probe_optimizer = probe_optimizer or SGD(0.1, momentum=0.9, name="probe_sgd")
        if self.probe is not None:
            self.probe_optimizer.build(self.probe.trainable_variables)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def _unpack(self, data):
        if isinstance(data, (tuple, list)) and len(data) == 1:
            data = data[0]
        labels = data.get("label") if isinstance(data, dict) else None
        if isinstance(data, dict) and "views" in data:
            views = tuple(data["views"])
        else:
            images = data["image"] if isinstance(data, dict) else data
            if self.views is None:
                raise ValueError("train_step got raw images but the model has no on-device views; pass views=… "
                                 "or feed {'views': (…)} from the pipeline")
            step = self.optimizer.iterations if getattr(self.views, "scheduled", False) else None
            views = self.views(images, step=step)
        return views, labels

    def loss_and_gradients(self, views):
        """(loss share, outputs, gradients of the student variables) for one step, without changing any state."""
        teacher = self.teacher_outputs(views) if self.uses_teacher else {}
        with tf.GradientTape() as tape:
            loss, out = self.student_loss(views, teacher)
            # mixed_float16: the LossScaleOptimizer scales the loss here and unscales (or skips) in apply_gradients
            scaled = self.optimizer.scale_loss(loss) if self.optimizer is not None else loss
        return loss, out, tape.gradient(scaled, self.student_variables)

    def train_step(self, data):
        views, labels = self._unpack(data)
        if self.uses_teacher:
            self.update_teacher()
        loss, out, grads = self.loss_and_gradients(views)
        self.optimizer.apply_gradients(zip(grads, self.student_variables))
        for queue, ptr, keys in out.get("enqueue", ()):
            self.enqueue(queue, ptr, keys)
        self.trackers["loss"].update_state(distribute.global_sum(loss))
        z = out["z"]
        z_std = tf.reduce_mean(tf.math.reduce_std(z, axis=0))
        self.trackers["z_std"].update_state(distribute.global_mean(z_std))
        for name in self.metric_names:
            self.trackers[name].update_state(distribute.global_mean(out[name]))
        if labels is not None:
            for name, value in self.label_metrics(out, labels).items():
                self.trackers[name].update_state(value)
        if self.probe is not None and labels is not None:
            self.probe_step(out["features"], labels)
        logs = {name: t.result() for name, t in self.trackers.items()}
        logs["lr"] = self.optimizer.learning_rate
        if self.uses_teacher:
            logs["momentum"] = tf.identity(self.momentum)
        return logs

    def probe_step(self, features, labels):
        """Online linear probe on sg(features); unlabelled rows (label < 0) are ignored."""
        features = tf.stop_gradient(tf.cast(features, tf.float32))
        labels = tf.cast(labels, tf.int32)
        mask = tf.cast(labels >= 0, tf.float32)
        count = tf.maximum(distribute.global_sum(tf.reduce_sum(mask)), 1.0)
        with tf.GradientTape() as tape:
            logits = tf.cast(self.probe(features), tf.float32)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.maximum(labels, 0), logits)
            loss = tf.reduce_sum(ce * mask) / count
        grads = tape.gradient(loss, self.probe.trainable_variables)
        self.probe_optimizer.apply_gradients(zip(grads, self.probe.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), labels), tf.float32) * mask)
        self.trackers["probe_loss"].update_state(distribute.global_sum(loss))
        self.trackers["probe_acc"].update_state(distribute.global_sum(correct) / count)
