"""MoCo v2 (Chen et al. 2020): InfoNCE of a query against its teacher key and a queue of past keys.

ℓ = −log exp(q·k/τ) / (exp(q·k/τ) + Σ_n exp(q·n/τ)) (:func:`tfssl.losses.info_nce_terms`). ``symmetric`` also
uses the second view as query (both keys enqueued). Shuffle-BN is replaced by synchronized BN (documented deviation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import keras
import tensorflow as tf

from tfssl.losses import info_nce_terms
from tfssl.methods.base import SSLMethod


@dataclass
class MoCoV2Params:
    method_name: ClassVar[str] = "mocov2"
    temperature: float = 0.2
    queue_size: int = 4096
    momentum: float = 0.99
    momentum_schedule: str = "constant"
    symmetric: bool = False


@keras.saving.register_keras_serializable(package="tfssl")
class MoCoV2(SSLMethod):
    """MoCo v2: query from the student on view 1, key from the teacher on view 2, negatives from the queue."""

    method_name = "mocov2"
    Params = MoCoV2Params
    uses_teacher = True
    view_recipes = ("strong", "strong")

    def __init__(self, params, model_cfg, **kw):
        super().__init__(params, model_cfg, **kw)
        self.queue, self.queue_ptr = self.add_queue("queue", params.queue_size, model_cfg.projector_dim)

    def teacher_outputs(self, views):
        keys = {"k2": self.teacher_embed(views[1])}
        if self.params.symmetric:
            keys["k1"] = self.teacher_embed(views[0])
        return keys

    def student_loss(self, views, teacher):
        tau = self.params.temperature
        features, q1 = self.student_embed(views[0])
        terms = [info_nce_terms(q1, teacher["k2"], self.queue, tau)]
        enqueue = [(self.queue, self.queue_ptr, teacher["k2"])]
        if self.params.symmetric:  # enqueued one key set at a time: global order must not depend on replicas
            _, q2 = self.student_embed(views[1])
            terms.append(info_nce_terms(q2, teacher["k1"], self.queue, tau))
            enqueue.append((self.queue, self.queue_ptr, teacher["k1"]))
        loss = tf.add_n([tf.reduce_sum(t) for t in terms]) / (self.global_batch(q1) * len(terms))
        return loss, {"features": features, "z": q1, "enqueue": enqueue}
