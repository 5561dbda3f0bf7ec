"""One worker of tests/test_multiworker.py (started by ``tfssl.launch.launch_local``; not a test module).

Usage: ``python multiworker_worker.py CASEDIR``. ``TF_CONFIG`` names the cluster and this worker's index. The
strategy is created first (``distribute.strategy=multi_worker`` via ``make_strategy``), before any other TensorFlow
op, and the CPU is *not* split: this process is one replica. Then, for every case listed in ``CASEDIR/cases.json``
(written by the test with the recipe YAML, views, labels and initial weights of each case), the method model is
built fresh, loaded with the initial weights and trained one step (``model.train_step`` under the strategy, see
:func:`train_step`) on this worker's contiguous share of the global batch; logs, every weight and the queues go to
``CASEDIR/<case>_worker<i>.npz``.

Building, feeding and recording come from tests/helpers.py, as for the test's references (1 device, 2 replicas).
"""
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's tfssl
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                    # tests/helpers.py

import numpy as np  # noqa: E402

from helpers import build, replica_rows, results, train_step, weights_of  # noqa: E402


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
        out = results(model, train_step(model, strategy, replica_rows(strategy, {"views": views, "label": labels})))
        path = os.path.join(casedir, f"{case['id']}_worker{index}.npz")
        np.savez(path + ".tmp.npz", **out)
        os.replace(path + ".tmp.npz", path)
        print(f"{case['id']}: loss {float(out['log_loss']):.6f} ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"done in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
