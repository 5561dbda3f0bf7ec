"""Everything about replicas lives here: the strategy factory, gather-with-gradient, replica offsets, global sums.

Conventions used by every method (METHODS.md, "Shared machinery"):

* Each replica computes the loss terms of its *local* anchors against *gathered* (global) candidates and returns
  ``sum(local terms) / global_count``. Keras sums gradients over replicas, so the applied gradient is the gradient
  of the global mean, with no double averaging.
* :func:`gather` is ``ReplicaContext.all_gather``; TensorFlow's gradient for it all-reduces (sums) the incoming
  gradient and slices out the local rows, so the gradient of every replica's loss reaches the replica that produced
  each row. Row ``r * B_local + i`` of a gathered tensor is row ``i`` of replica ``r``.
"""
from __future__ import annotations

import json
import os

import tensorflow as tf

from tfssl import devices


def num_replicas() -> int:
    """Number of replicas in sync (1 outside any strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def _replica_ctx():
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def replica_id():
    """This replica's index as an int32 tensor (0 outside a strategy)."""
    ctx = _replica_ctx()
    return tf.constant(0, tf.int32) if ctx is None else tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def gather(x):
    """Concatenate ``x`` from all replicas along axis 0 (identity on one replica); differentiable, see module doc."""
    ctx = _replica_ctx()
    # tf.identity: under MultiWorkerMirroredStrategy a bare function argument has no device for the collective
    return x if ctx is None else ctx.all_gather(tf.identity(x), axis=0)


def replica_offset(local_batch):
    """Index of this replica's first row inside a gathered tensor (equal local batches)."""
    return replica_id() * tf.cast(local_batch, tf.int32)


def global_sum(x):
    """Sum of ``x`` over replicas (identity on one replica). Use for metrics, never inside the loss."""
    ctx = _replica_ctx()
    return x if ctx is None else ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)


def global_mean(x):
    """Mean of ``x`` over replicas."""
    ctx = _replica_ctx()
    return x if ctx is None else ctx.all_reduce(tf.distribute.ReduceOp.MEAN, x)


def is_chief(strategy=None) -> bool:
    """True on the process that writes checkpoints, summaries and exports: always, except under a multi-worker
    strategy, where it is the ``chief`` task, or worker 0 when the cluster has no chief (TF_CONFIG convention)."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    kind, index = resolver.task_type, resolver.task_id
    has_chief = "chief" in (resolver.cluster_spec().as_dict() or {})
    return kind in (None, "chief") or (kind == "worker" and index == 0 and not has_chief)


def split_cpu(n: int) -> None:
    """Split the first CPU into ``n`` logical devices (must run before TensorFlow initialises its devices)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        raise RuntimeError(f"distribute.logical_cpus={n} must be set before TensorFlow is initialised ({e}); "
                           "start a fresh process") from None


_MIRRORED = {}


def mirrored(devices):
    """One MirroredStrategy per device set and process: a second strategy over the same devices restarts the
    collective instance keys and collides with the first one's cached collectives (seen as shape mismatches)."""
    key = tuple(devices)
    if key not in _MIRRORED:
        _MIRRORED[key] = tf.distribute.MirroredStrategy(list(devices))
    return _MIRRORED[key]


def make_strategy(cfg):
    """Build the ``tf.distribute`` strategy named by ``cfg.distribute`` (a :class:`DistributeConfig`)."""
    name = cfg.strategy
    if cfg.logical_cpus and cfg.logical_cpus > 1:
        split_cpu(cfg.logical_cpus)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        return mirrored([d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")])
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            from tfssl.config import ConfigError
            raise ConfigError("distribute.strategy=multi_worker needs the TF_CONFIG environment variable "
                               "(cluster and task); see README 'Running on a cluster'")
        json.loads(os.environ["TF_CONFIG"])
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=cfg.tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"distribute.strategy={name!r} is not one of default, mirrored, multi_worker, tpu")


def is_multi_worker(strategy) -> bool:
    """True under ``MultiWorkerMirroredStrategy``."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def train_plan(setting_jit, kernels="auto", precision="float32", strategy=None, views="auto", autotune="auto"):
    """The device plan (:func:`tfssl.devices.plan`) of a train step under ``strategy`` (default: the current one)
    while TensorFlow's deterministic ops are on or off in this process."""
    from tensorflow.python.framework import config as tf_config    # no public getter for the flag
    strategy = strategy or tf.distribute.get_strategy()
    return devices.plan(devices.detect(strategy), setting_jit, kernels, precision, multi_worker=is_multi_worker(strategy),
                        deterministic=tf_config.is_op_determinism_enabled(), views=views,
                        autotune=autotune)


def strategy_name(strategy) -> str:
    """The public name of ``strategy`` (MultiWorkerMirroredStrategy's class is CollectiveAllReduceStrategy)."""
    return "MultiWorkerMirroredStrategy" if is_multi_worker(strategy) else type(strategy).__name__


class MultiWorkerFit:
    """Mixin (before ``keras.Model``) that lets Keras 3.15's ``model.fit`` run under MultiWorkerMirroredStrategy.

    Keras fails there twice (keras-team/keras#20585, #20329): ``_maybe_symbolic_build`` pulls a batch and
    ``strategy.reduce``-s the dict batch, and the train function reduces every log with
    ``strategy.reduce(MEAN, v, axis=0)``, which rejects scalars. Under that strategy only, the model (built at
    construction) skips the symbolic build, and its train function takes each log from this worker's first replica:
    a method's logs are already global (all-reduced in ``train_step``), so every worker logs the same values. Any
    other strategy keeps Keras's own code path. XLA is not used under it on CPU (no XLA collectives there).
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if not is_multi_worker(self.distribute_strategy):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        with self.distribute_strategy.scope():
            if self.optimizer is not None and not self.optimizer.built:
                self.optimizer.build(self.trainable_variables)

    def make_train_function(self, force=False):
        strategy = self.distribute_strategy
        on_cpu = not tf.config.list_logical_devices("GPU")
        if self.train_function is None or force:       # BatchNorm / conv training kernels of the device plan
            plan = train_plan(bool(self.jit_compile), getattr(self, "kernel_setting", "auto"), strategy=strategy)
            devices.apply_kernels(self, plan)
            self.kernel_plan = plan
        if not is_multi_worker(strategy):
            return super().make_train_function(force=force)
        if self.train_function is not None and not force:
            return self.train_function
        step_fn = tf.function(self.train_step, jit_compile=True) if self.jit_compile and not on_cpu \
            else self.train_step

        def one_step(iterator):
            logs = strategy.run(step_fn, args=(next(iterator),))
            return tf.nest.map_structure(lambda v: tf.convert_to_tensor(strategy.experimental_local_results(v)[0]),
                                         logs)

        def train_function(iterator):
            logs = one_step(iterator)
            for _ in tf.range(self.steps_per_execution - 1):
                logs = one_step(iterator)
            return logs
        self.train_function = train_function if self.run_eagerly else tf.function(train_function)
        return self.train_function
