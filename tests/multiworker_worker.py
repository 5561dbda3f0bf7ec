"""One worker of tests/test_multiworker.py (started by ``tfssl.launch.launch_local``; not a test module).

Usage: ``python multiworker_worker.py CASEDIR``. ``TF_CONFIG`` names the cluster and this worker's index. The
strategy is created first (``distribute.strategy=multi_worker`` via ``make_strategy``), before any other TensorFlow
op, and the CPU is *not* split: this process is one replica. Then, for every case listed in ``CASEDIR/cases.json``
(written by the test with the recipe YAML, views, labels and initial weights of each case), the method model is
built fresh, loaded with the initial weights and trained one step (``model.train_step`` under the strategy, see
:func:`train_step`) on this worker's contiguous share of the global batch; logs, every weight and the queues go to
``CASEDIR/<case>_worker<i>.npz``.

The test imports :func:`build`, :func:`distributed_batch`, :func:`train_step` and :func:`results` from here, so
the reference runs (one device, 2-replica MirroredStrategy) build, feed and record models like the workers.
"""
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's tfssl

import numpy as np  # noqa: E402


def build(cfg, strategy, weights=None):
    """The method model under ``strategy`` (num_classes=10, SGD as in test_methods), optionally loaded with
    ``weights`` (a ``model.get_weights()`` list)."""
    from tfssl import methods
    from tfssl.optim import SGD
    with strategy.scope():
        model = methods.build(cfg, num_classes=10, total_steps=10)
        model.compile(SGD(0.1, momentum=0.9, weight_decay=5e-4), probe_optimizer=SGD(0.1, momentum=0.9))
        if weights is not None:
            model.set_weights(weights)
    return model


def distributed_batch(strategy, views, labels):
    """One global batch as per-replica values: global replica ``r`` gets rows ``r·b … (r+1)·b − 1``.

    Under MultiWorkerMirroredStrategy ``replica_id_in_sync_group`` is global (worker-major: worker ``w``'s local
    replica ``j`` is ``w·L + j``), the order ``all_gather`` uses, so each worker feeds its contiguous share.
    """
    n, rows = strategy.num_replicas_in_sync, len(labels)
    assert rows % n == 0, (rows, n)
    b = rows // n

    def local(ctx):
        r = ctx.replica_id_in_sync_group
        return {"views": tuple(v[r * b:(r + 1) * b] for v in views), "label": labels[r * b:(r + 1) * b]}
    return strategy.experimental_distribute_values_from_function(local)


def train_step(model, strategy, batch):
    """One training step: ``model.train_step`` on every replica, as ``model.fit`` runs it; the logs (globally
    reduced inside the step) of this worker's first replica, as floats.

    Not ``model.fit`` itself: Keras 3.15's fit cannot run under MultiWorkerMirroredStrategy (keras-team/keras#20585,
    #20329). Before the first step ``_maybe_symbolic_build`` calls ``strategy.reduce("MEAN", batch)`` on the whole
    (dict) batch, which MultiWorkerMirroredStrategy rejects ("Attempt to convert a value ({'views': (PerReplica…)");
    after the step ``reduce_per_replica(logs, "auto")`` reduces every log with ``strategy.reduce("MEAN", v,
    axis=0)``, which fails on scalars ("Invalid reduction dimension 0 for input with 0 dimensions").
    """
    import tensorflow as tf

    def replica_step(data):
        # tf.identity places the inputs on the replica's device: a tf.function argument has no device, and
        # MultiWorkerMirroredStrategy's all_gather of a device-less tensor (WCL gathers the labels as given)
        # fails with "destinations can not be empty". Batches from a distributed dataset carry their device.
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
    """The ``model.get_weights()`` list stored by :func:`results` or the test's initial-weights file (an opened
    ``.npz`` or a dict)."""
    return [npz[k] for k in sorted(k for k in npz.keys() if k.startswith("w") and k[1:].isdigit())]


def main(casedir):
    tf_config = json.loads(os.environ["TF_CONFIG"])
    index = tf_config["task"]["index"]
    start = time.perf_counter()

    import tensorflow as tf
    from tfssl import config, distribute
    strategy = distribute.make_strategy(config.DistributeConfig(strategy="multi_worker"))

    import keras
    local = strategy.extended.worker_devices   # this worker's replicas (list_logical_devices shows the cluster's)
    print(f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} replicas, local {', '.join(local)}; "
          f"worker {index} of {len(tf_config['cluster']['worker'])} (started in {time.perf_counter() - start:.1f} s)",
          flush=True)
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and len(local) == 1, local
    assert strategy.num_replicas_in_sync == len(tf_config["cluster"]["worker"])

    with open(os.path.join(casedir, "cases.json")) as f:
        cases = json.load(f)
    for case in cases:
        t = time.perf_counter()
        keras.utils.set_random_seed(0)
        cfg = config.load(os.path.join(casedir, case["id"] + ".yaml"))
        with np.load(os.path.join(casedir, case["id"] + "_init.npz")) as init:
            views = tuple(init[f"view{k}"] for k in range(case["num_views"]))
            labels, weights = init["labels"], weights_of(init)
        model = build(cfg, strategy, weights)
        out = results(model, train_step(model, strategy, distributed_batch(strategy, views, labels)))
        path = os.path.join(casedir, f"{case['id']}_worker{index}.npz")
        np.savez(path + ".tmp.npz", **out)
        os.replace(path + ".tmp.npz", path)
        print(f"{case['id']}: loss {float(out['log_loss']):.6f} ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"done in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
