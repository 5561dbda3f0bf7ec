"""SimCLR (Chen et al., ICML 2020): NT-Xent between two views over the global batch (the WCL baseline).

Each replica scores its local anchors against the 2B gathered views; positives sit at the replica offset
(``tfssl.distribute.replica_offset``), the multi-GPU bug of many SimCLR ports avoided by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import keras
import tensorflow as tf

from tfssl import distribute
from tfssl.losses import nt_xent_terms
from tfssl.methods.base import SSLMethod


@dataclass
class SimCLRParams:
    method_name: ClassVar[str] = "simclr"
    temperature: float = 0.5


@keras.saving.register_keras_serializable(package="tfssl")
class SimCLR(SSLMethod):
    """SimCLR: two SimCLR-strength views, both with gradient, no teacher, no queue."""

    method_name = "simclr"
    Params = SimCLRParams
    view_recipes = ("simclr", "simclr")

    def student_loss(self, views, teacher):
        features, z1 = self.student_embed(views[0])
        _, z2 = self.student_embed(views[1])
        terms = nt_xent_terms(z1, z2, distribute.gather(z1), distribute.gather(z2),
                              distribute.replica_offset(tf.shape(z1)[0]), self.params.temperature)
        return tf.reduce_sum(terms) / (2.0 * self.global_batch(z1)), {"features": features, "z": z1}
