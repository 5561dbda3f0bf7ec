"""Test setup: the CPU is split into 2 logical devices before TensorFlow starts, so any test can build a
MirroredStrategy over two replicas (the default strategy keeps using /cpu:0)."""
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfssl import config as tfssl_config  # noqa: E402
from tfssl.distribute import mirrored as mirrored_strategy, split_cpu  # noqa: E402

split_cpu(2)


@pytest.fixture(scope="session")
def mirrored():
    """The 2-replica MirroredStrategy on the two logical CPUs (the same object `distribute.strategy=mirrored` gets)."""
    return mirrored_strategy([d.name for d in tf.config.list_logical_devices("CPU")])


def tiny_config(method, **method_params):
    """A recipe with the tiny ResNet and a small projector, for fast tests."""
    return tfssl_config.from_dict({
        "method": {"name": method, **method_params},
        "model": {"backbone": "tiny", "projector_hidden": 32, "projector_dim": 16, "sync_bn": True},
        "augment": {"preset": "fashion_mnist", "size": 32},
        "data": {"image_size": 32},
    })


def h5_weights(path):
    """{dataset path: array} of every dataset in a Keras ``.weights.h5`` file (compare two runs' checkpoints)."""
    import h5py
    import numpy as np
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, np.array(obj)) if isinstance(obj, h5py.Dataset) else None)
    return out
