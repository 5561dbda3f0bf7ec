"""Helpers shared by the test files (not a test module): the method cases of one training step, their crafted views,
building a method model, feeding a global batch to replicas, one step under a strategy, recording its results, and
the step of 1 device and of 2 replicas computed once per session (:func:`one_step_cases`)."""
import functools

import numpy as np

B = 8                    # global batch of the one-step cases
CASES = [("ressl", dict(queue_size=32)), ("ressl", dict(queue_size=32, crop_sizes=[16, 24])),
         ("simclr", dict(temperature=0.5)), ("mocov2", dict(queue_size=32)),
         ("mocov2", dict(queue_size=32, symmetric=True)), ("wcl", dict()),
         ("wcl", dict(knn_crops=3, knn_crop_size=16, knn_crops_keep=2)), ("csml", dict(queue_size=32)),
         ("csml", dict(queue_size=32, cross_warmup_epochs=0, levels=[3, 4]))]
# each method's richest variant (multi-crop, symmetric, KNN crops, stage-3 level with the cross-sample phase on):
# it runs every line of the simpler variant, and every gather, queue and synchronized-BN path of the method
RICHEST = [CASES[i] for i in (1, 2, 4, 6, 8)]


def case_id(name, params):
    """A file-name-safe id of a case, e.g. ``ressl-crop_sizes_16_24-queue_size_32``."""
    import re
    text = "-".join(f"{k}_{v}" for k, v in sorted(params.items())) or "default"
    return f"{name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', text).strip('_')}"


def case_views(cfg, seed=0):
    """(views, labels) of one global batch of B images for ``cfg``'s method: random views of the sizes the method
    takes; WCL's are crafted so its discrete choices have clear margins; CsMl's are the pair pipeline's six."""
    import tensorflow as tf
    from tfssl import methods
    rng = np.random.default_rng(seed)
    sizes = [32, 32] + methods.METHODS[cfg.method.method_name].small_crops(cfg.method, 32)[0]
    views = tuple(rng.uniform(0, 1, (B, s, s, 3)).astype("float32") for s in sizes)
    if cfg.method.method_name == "wcl":
        # image i + B/2 is a noisy copy of image i: 1-NN edges then have clear margins (≥ 1e-3; random images
        # under a random net are near-ties that float rounding flips) and many cross the replica boundary. Closer
        # copies would make the loss ill-conditioned (a negative almost equal to the positive).
        views = tuple(np.concatenate([v[:B // 2], v[:B // 2] + 0.3 * rng.standard_normal(v[:B // 2].shape)])
                      .astype("float32") for v in views)
        # KNN crops: crop c is view 1 downsized plus noise growing with c, so the kept (nearest) crops are clearer
        crops = [tf.image.resize(views[0], (s, s)).numpy() + 0.5 * (c + 1) * rng.standard_normal((B, s, s, 3))
                 for c, s in enumerate(sizes[2:])]
        views = views[:2] + tuple(c.astype("float32") for c in crops)
    if cfg.method.method_name == "csml":   # (q_i, k_i, q_j, k_j, q_mix) and λ′ per row, as pair_pipeline gives
        views = tuple(rng.uniform(0, 1, (B, 32, 32, 3)).astype("float32") for _ in range(5))
        views += (np.full(B, rng.uniform(0.2, 0.9), "float32"),)
    return views, rng.integers(0, 10, B).astype("int32")


def build(cfg, strategy, weights=None, record=False):
    """The method model under ``strategy`` (num_classes=10, SGD), optionally loaded with ``weights``; ``record``:
    the optimizer keeps each step's gradients (:func:`recording_sgd`)."""
    from tfssl import methods
    from tfssl.optim import SGD
    with strategy.scope():
        model = methods.build(cfg, num_classes=10, total_steps=10)
        opt = (recording_sgd() if record else SGD)(0.1, momentum=0.9, weight_decay=5e-4)
        model.compile(opt, probe_optimizer=SGD(0.1, momentum=0.9))
        if weights is not None:
            model.set_weights(weights)
    return model


@functools.lru_cache(None)
def recording_sgd():
    """The class :class:`RecordingSGD` (made on first use: tfssl and TensorFlow are imported lazily here)."""
    from tfssl.optim import SGD

    class RecordingSGD(SGD):
        """tfssl's SGD that also keeps, per variable, the gradient its last update applied: under a strategy the
        gradient summed over the replicas, as Keras hands it to ``update_step``. A test reads the gradients of the
        very step ``fit`` ran instead of tracing the model a second time to compute them."""

        def build(self, variables):
            if self.built:
                return
            super().build(variables)
            self.last_gradients = [self.add_variable_from_reference(v, "last_gradient") for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            self.assign(self.last_gradients[self._get_variable_index(variable)], gradient)
            super().update_step(gradient, variable, learning_rate)
    return RecordingSGD


def replica_rows(strategy, *arrays):
    """Per-replica values of a global batch: global replica ``r`` gets rows ``r·b … (r+1)·b − 1`` of every array
    (nested tuples/dicts allowed). Under MultiWorkerMirroredStrategy ``replica_id_in_sync_group`` is global
    (worker-major), the order ``all_gather`` uses, so each worker feeds its contiguous share."""
    import tensorflow as tf
    n = strategy.num_replicas_in_sync

    def local(ctx):
        r = ctx.replica_id_in_sync_group

        def rows(a):
            b = len(a) // n
            return a[r * b:(r + 1) * b]
        return tf.nest.map_structure(rows, arrays if len(arrays) > 1 else arrays[0])
    return strategy.experimental_distribute_values_from_function(local)


def train_step(model, strategy, batch):
    """One training step: ``model.train_step`` on every replica, as ``model.fit`` runs it; the logs (globally
    reduced inside the step) of this process's first replica, as floats.

    Not ``model.fit`` itself: under MultiWorkerMirroredStrategy Keras 3.15's fit needs tfssl's MultiWorkerFit
    changes (keras-team/keras#20585, #20329), which the pretraining job tests; this proves the step alone."""
    import tensorflow as tf

    def replica_step(data):
        # tf.identity places the inputs on the replica's device: a tf.function argument has no device, and
        # MultiWorkerMirroredStrategy's all_gather of a device-less tensor fails ("destinations can not be empty")
        return model.train_step(tf.nest.map_structure(tf.identity, data))

    @tf.function
    def run(data):
        return strategy.run(replica_step, args=(data,))
    logs = run(batch)
    return {k: float(strategy.experimental_local_results(v)[0]) for k, v in logs.items()}


def results(model, logs):
    """Everything a step leaves behind (``logs``: name → float), as a dict of numpy arrays for ``np.savez``."""
    out = {f"log_{k}": np.asarray(v, "float32") for k, v in logs.items()}
    for i, w in enumerate(model.get_weights()):
        out[f"w{i:04d}"] = w
    for name in ("queue", "queue_ptr", "queue3", "queue3_ptr"):
        if hasattr(model, name):
            out[name] = np.asarray(getattr(model, name).numpy())
    out["iterations"] = np.asarray(int(model.optimizer.iterations.numpy()))
    return out


def weights_of(npz):
    """The ``model.get_weights()`` list stored by :func:`results` (an opened ``.npz`` or a dict)."""
    return [npz[k] for k in sorted(k for k in npz.keys() if k.startswith("w") and k[1:].isdigit())]


class OneStep:
    """One case's first step on 1 device (Keras fit) and on 2 replicas (fit under MirroredStrategy), from the same
    initial weights and batch: the models (which tests may step further), the loss and gradients of that step (read
    off the optimizer: one trace per model, not a second one for the gradients), histories and a snapshot of
    :func:`results` taken right after the step (compared with the multi-worker workers)."""

    def __init__(self, name, params, mirrored):
        import keras
        import tensorflow as tf
        from conftest import tiny_config
        keras.utils.set_random_seed(0)
        self.cfg = tiny_config(name, **params)
        self.views, self.labels = case_views(self.cfg)
        default = tf.distribute.get_strategy()
        self.one = build(self.cfg, default, record=True)
        self.init = self.one.get_weights()
        self.two = build(self.cfg, mirrored, self.init, record=True)
        batch = tf.data.Dataset.from_tensors({"views": self.views, "label": self.labels})
        self.history1 = self.one.fit(batch, epochs=1, verbose=0).history
        self.history2 = self.two.fit(batch, epochs=1, verbose=0).history
        last = lambda h: {k: v[-1] for k, v in h.items()}   # noqa: E731
        self.results1, self.results2 = results(self.one, last(self.history1)), results(self.two, last(self.history2))
        # the step's global loss and the gradients the optimizer applied (summed over the replicas)
        self.loss1, self.loss2 = self.history1["loss"][-1], self.history2["loss"][-1]
        self.grads1 = [v.numpy() for v in self.one.optimizer.last_gradients]
        self.grads2 = [v.numpy() for v in self.two.optimizer.last_gradients]
        self.names = [v.path for v in self.one.weights]


_ONE_STEP = {}


def one_step_cases(name, params, mirrored):
    """:class:`OneStep` of a case, computed once per test process (test_methods and test_multiworker share it)."""
    key = case_id(name, params)
    if key not in _ONE_STEP:
        _ONE_STEP[key] = OneStep(name, params, mirrored)
    return _ONE_STEP[key]
