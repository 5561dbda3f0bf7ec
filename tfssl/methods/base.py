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

from tfssl import data, devices, distribute, pipeline, rng
from tfssl.backbones import build_backbone, build_mlp, feature_dim
from tfssl.methods.keras_native import KerasNative
from tfssl.optim import SGD, SkipNonFinite, excluded


def normalize(x):
    """L2-normalise rows (float32)."""
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=1)


class SSLMethod(KerasNative, distribute.MultiWorkerFit, keras.Model):
    """Shared machinery of a self-supervised method; subclasses implement :meth:`student_loss`."""

    method_name = "base"
    uses_teacher = False
    view_recipes = ("strong", "strong")
    warmup_view_recipes = None   # recipes of the first ``params.view_warmup_epochs`` epochs (a view schedule)
    metric_names = ()            # scalars a method returns in its outputs dict, averaged over replicas
    label_metric_names = ()      # scalars of :meth:`label_metrics` (need the monitoring labels)

    def __init__(self, params, model_cfg, num_classes=0, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, views=None,
                 total_steps=1, seed=0, steps_per_epoch=None, on_nan="stop", kernels="auto", augment=None, **kw):
        super().__init__(name=kw.pop("name", self.method_name), **kw)
        self.augment = dict(augment) if augment else None   # the recipe's augment section (kept by get_config)
        if on_nan not in ("stop", "skip"):
            raise ValueError(f"on_nan={on_nan!r} is not one of stop, skip")
        self.on_nan = on_nan
        self.kernel_setting = kernels           # train.kernels: the device plan's conv/BN kernels (tfssl.devices)
        self.params, self.model_cfg, self.num_classes = params, model_cfg, num_classes
        self.total_steps, self.seed = max(1, int(total_steps)), seed
        self.steps_per_epoch = int(steps_per_epoch or self.total_steps)
        self.views = views
        self._bb_args = dict(name=model_cfg.backbone, cifar_stem=model_cfg.cifar_stem, width=model_cfg.width,
                             sync_bn=model_cfg.sync_bn, channels=channels, mean=mean, std=std,
                             stem_pool=model_cfg.stem_pool)
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
        names = ("loss", "probe_loss", "probe_acc", "z_std") + (("skipped",) if on_nan == "skip" else ()) + tuple(self.metric_names) + tuple(self.label_metric_names)
        self.trackers = {n: keras.metrics.Sum(name=n) if n == "skipped" else keras.metrics.Mean(name=n) for n in names}
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

    def enqueue(self, queue, ptr, keys, when=None):
        """Write the gathered keys of all replicas (global batch order: replica 0's rows first) at the pointer.

        Rows ``ptr … ptr+B−1`` (mod K) are replaced, i.e. the oldest entries; ``ptr ← (ptr + B) mod K``. Every
        replica computes the same gathered keys, so every replica holds the same queue.
        """
        keys = distribute.gather(tf.cast(keys, queue.dtype))
        n, size = tf.shape(keys)[0], queue.shape[0]
        idx = tf.math.floormod(ptr + tf.range(n), size)
        if when is not None:                        # train.on_nan: skip — a skipped step writes nothing
            keys = tf.where(when, keys, tf.gather(queue, idx))
            n = tf.where(when, n, 0)
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
    def make_pipeline(self, source, views, cfg, steps, epoch, views_parallelism=None):
        """The tf.data pipeline of pretraining: one endless iterator from the epoch that ``epoch`` (a host int64
        variable set at every epoch start) holds when ``model.fit`` opens it, ``steps`` batches per epoch fixed by
        (data seed, epoch) (:func:`tfssl.pipeline.epoch_pipeline`, ``endless``); views made in the pipeline unless
        on the device, at most ``views_parallelism`` batches at once (the device plan's; None: AUTOTUNE). A source
        without random access (large TFDS) gets a shuffled stream instead (:func:`tfssl.pipeline.stream_pipeline`)."""
        par = {"views_parallelism": views_parallelism}
        pipeline_views = None if cfg.augment.on_device else views
        if source.originals and source.lookup_original is None:      # originals without random access (TFDS)
            if pipeline_views is None:
                raise data.DataError(f"{source.name}: views on the device need images of one size, but this source "
                                     f"crops its originals in the input pipeline; set augment.on_device=false")
            return pipeline.stream_pipeline(source.train, cfg.train.batch_size, steps, epoch, pipeline_views,
                                            seed=cfg.data.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                            originals_ds=source.train_original, **par)
        if not source.originals:
            try:
                data.indexed(source)
            except data.DataError:
                return pipeline.stream_pipeline(source.train, cfg.train.batch_size, steps, epoch, pipeline_views,
                                                seed=cfg.data.seed, shuffle_buffer=cfg.data.shuffle_buffer, **par)
        return pipeline.epoch_pipeline(source, cfg.train.batch_size, steps, epoch, pipeline_views, seed=cfg.data.seed,
                                       endless=epoch is not None, **par)

    def job_callbacks(self, source, cfg, log=print):
        """Extra Keras callbacks of pretraining (CsMl: neighbour mining)."""
        return []

    def job_state(self):
        """(host variables, callable → JSON-able records) a resumed run needs beyond the model's own weights."""
        return {}, dict

    def load_job_state(self, records):
        """Restore the records of :meth:`job_state` from a backup (``{}`` on a fresh run)."""

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
        if self.on_nan == "skip" and not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            self.optimizer = SkipNonFinite(self.optimizer)      # (mixed_float16's loss scaling already skips)
        if getattr(self.optimizer, "weight_decay", None) and not isinstance(self.optimizer, SGD):
            # Keras optimizers (e.g. Lamb) decay every variable: exempt BN parameters and biases, as tfssl's own do
            kinds = getattr(self.optimizer, "tfssl_wd_exclude", ("bn", "bias"))
            self.optimizer.exclude_from_weight_decay(var_list=[v for v in self.student_variables if excluded(v, kinds)])
        self.optimizer.build(self.student_variables)
        self.probe_optimizer = probe_optimizer or SGD(0.1, momentum=0.9, name="probe_sgd")
        if self.on_nan == "skip":
            self.probe_optimizer = SkipNonFinite(self.probe_optimizer)
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
            return tuple(data["views"]), labels
        if self.views is None:
            raise ValueError("train_step got raw images but the model has no on-device views; pass views=… "
                             "or feed {'views': (…)} from the pipeline")
        step = self.optimizer.iterations
        # stateless draws keyed by (seed, step, replica): a resumed run makes the same views (resume.py)
        base = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        seed = rng.fold_in(base, distribute.replica_id())
        return tuple(self.device_views(data, step, seed, base)), labels

    def device_views(self, data, step, seed, global_seed):
        """The views of a batch of raw images made on the device (``augment.on_device``): ``seed`` is this
        replica's stateless seed of the step, ``global_seed`` the same on every replica (for one draw per global
        batch, e.g. CsMl's CutMix box)."""
        images = data["image"] if isinstance(data, dict) else data
        return self.views(images, step=step, seed=seed)

    def example_batch(self, size):
        """A small raw batch of the structure :meth:`device_views` takes (for the XLA check)."""
        return {"image": tf.zeros([2, size, size, self._bb_args["channels"]], tf.uint8)}

    def check_views_compile(self, size):
        """With on-device views in an XLA step, compile the views alone first, so that an op without an XLA kernel
        is one :class:`tfssl.config.ConfigError` naming it and the settings to change, before any training."""
        if self.views is None:
            return
        from tfssl.config import ConfigError
        zero = tf.constant(0, tf.int64)
        seed = tf.constant([0, 0], tf.int64)
        fn = tf.function(lambda batch: self.device_views(batch, zero, seed, seed), jit_compile=True)
        try:
            fn.experimental_get_compiler_ir(self.example_batch(size))(stage="hlo")
        except Exception as e:          # TF raises InvalidArgumentError or UnimplementedError, by op kind
            op = devices.first_unsupported_op(e)
            if op is None:
                raise
            raise ConfigError(f"augment.on_device=true under XLA: the view op {op} has no XLA kernel (a layer of "
                              f"the views, e.g. one of augment.extra, uses it); set augment.on_device=false (views "
                              f"in the tf.data pipeline) or train.jit_compile=false") from None

    def make_train_function(self, force=False):
        if self.jit_compile and (self.train_function is None or force):
            self.check_views_compile(getattr(self.views, "_args", {}).get("size", 32))
        return super().make_train_function(force=force)

    def loss_and_gradients(self, views):
        """(loss share, outputs, gradients of the student variables) for one step, without changing any state."""
        teacher = self.teacher_outputs(views) if self.uses_teacher else {}
        with tf.GradientTape() as tape:
            loss, out = self.student_loss(views, teacher)
            # mixed_float16: the LossScaleOptimizer scales the loss here and unscales (or skips) in apply_gradients
            scaled = self.optimizer.scale_loss(loss) if self.optimizer is not None else loss
        return loss, out, tape.gradient(scaled, self.student_variables)

    def agree_finite(self, loss, grads):
        """``train.on_nan: skip``: (finite, grads) where ``finite`` is true when the loss and gradients of *every*
        replica are finite, and the gradients are made non-finite on every replica otherwise, so that all replicas
        skip the same step (:class:`tfssl.optim.SkipNonFinite`)."""
        local = tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.cast(t, tf.float32))) for t in [loss] + grads])
        finite = distribute.global_sum(1.0 - tf.cast(local, tf.float32)) == 0.0
        nan = tf.constant(float("nan"))
        return finite, [tf.where(finite, g, tf.cast(nan, g.dtype)) for g in grads]

    def _step_state(self):
        """What a step changes besides the optimizer and queues: BatchNorm moving statistics of every network and
        the teacher (EMA). A skipped step (``train.on_nan: skip``) puts back their values from before it."""
        teacher = [t for t, _ in self.teacher_pairs] if self.uses_teacher else []
        return [v for v in self.non_trainable_variables if "moving_" in v.path] + teacher

    def train_step(self, data):
        views, labels = self._unpack(data)
        skip = self.on_nan == "skip"
        if skip:
            before = [tf.identity(v) for v in self._step_state()]
        if self.uses_teacher:
            # only once the batch is there: a call that finds the input exhausted must not move the teacher
            with tf.control_dependencies([views[0]]):
                self.update_teacher()
        loss, out, grads = self.loss_and_gradients(views)
        # a NaN in the views, the features or the gradients must reach the loss: fused oneDNN kernels (MatMul +
        # ReLU in the projector, BatchNorm + ReLU in the backbone) can map NaN to 0 on some CPUs and hide it from
        # the features, not from the gradients; 0·x adds nothing when everything is finite. mixed_float16's scaled
        # gradients may overflow legitimately (its LossScaleOptimizer then skips the step and lowers the scale)
        guarded = (out["features"],) + tuple(views)
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer) or skip:
            guarded += tuple(grads)
        loss = loss + 0.0 * tf.add_n([tf.reduce_sum(tf.stop_gradient(tf.cast(t, loss.dtype))) for t in guarded])
        finite = tf.constant(True)
        if skip:
            finite, grads = self.agree_finite(loss, grads)
        self.optimizer.apply_gradients(zip(grads, self.student_variables))
        for queue, ptr, keys in out.get("enqueue", ()):
            self.enqueue(queue, ptr, keys, finite if skip else None)
        if skip:
            for v, old in zip(self._step_state(), before):
                v.assign(tf.where(finite, v, old))
            self.trackers["skipped"].update_state(1.0 - tf.cast(finite, tf.float32))

        def track(name, value):                     # a skipped step does not enter the epoch means
            value = tf.cast(value, tf.float32)
            self.trackers[name].update_state(tf.where(finite, value, 0.0), sample_weight=tf.cast(finite, tf.float32))
        track("loss", distribute.global_sum(loss))
        z = out["z"]
        z_std = tf.reduce_mean(tf.math.reduce_std(z, axis=0))
        track("z_std", distribute.global_mean(z_std))
        for name in self.metric_names:
            track(name, distribute.global_mean(out[name]))
        if labels is not None:
            for name, value in self.label_metrics(out, labels).items():
                track(name, value)
        if self.probe is not None and labels is not None:
            features = tf.where(finite, out["features"], tf.zeros_like(out["features"])) if skip else out["features"]
            self.probe_step(features, labels, finite)
        logs = {name: t.result() for name, t in self.trackers.items()}
        logs["lr"] = self.optimizer.learning_rate
        if self.uses_teacher:
            logs["momentum"] = tf.identity(self.momentum)
        return logs

    def probe_step(self, features, labels, finite=True):
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
        if self.on_nan == "skip":                  # skipped with the student's step
            grads = [tf.where(finite, g, tf.cast(float("nan"), g.dtype)) for g in grads]
        self.probe_optimizer.apply_gradients(zip(grads, self.probe.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), labels), tf.float32) * mask)
        self.trackers["probe_loss"].update_state(distribute.global_sum(loss))
        self.trackers["probe_acc"].update_state(distribute.global_sum(correct) / count)
