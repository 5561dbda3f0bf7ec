"""ReSSL (Zheng et al., NeurIPS 2021): the student matches the teacher's *relation* to a queue of past keys.

Student q = ‖g(f(x_strong))‖, teacher k = ‖g_t(f_t(x_weak))‖; L = CE(softmax(k·Mᵀ/τt), softmax(q·Mᵀ/τs)) against
the queue M *before* this batch's keys are enqueued (eq. 3; :func:`tfssl.losses.ressl_terms`). Multi-crop: the
extra student crops (``crop_sizes``) are each compared with the same teacher relation; the loss is the mean over
all (1 + crops)·B rows. The official multi-GPU code uses shuffle-BN in the teacher; tfssl uses synchronized BN
(``model.sync_bn``), a documented deviation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List

import keras
import tensorflow as tf

from tfssl.losses import ressl_terms
from tfssl.methods.base import SSLMethod


@dataclass
class ReSSLParams:
    method_name: ClassVar[str] = "ressl"
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    queue_size: int = 4096
    momentum: float = 0.99
    momentum_schedule: str = "constant"     # constant | cosine
    crop_sizes: List[int] = field(default_factory=list)   # extra student crops, e.g. [192, 160, 128, 96]


@keras.saving.register_keras_serializable(package="tfssl")
class ReSSL(SSLMethod):
    """ReSSL: weak view → teacher, strong view(s) → student, relation loss on a queue of teacher keys."""

    method_name = "ressl"
    Params = ReSSLParams
    uses_teacher = True
    view_recipes = ("strong", "weak")

    def __init__(self, params, model_cfg, **kw):
        super().__init__(params, model_cfg, **kw)
        self.queue, self.queue_ptr = self.add_queue("queue", params.queue_size, model_cfg.projector_dim)

    @classmethod
    def small_crops(cls, params, size):
        """``crop_sizes`` crops, each with scale (0.2, 1)·crop/size (the official 192/160/128/96 at 224)."""
        sizes = list(params.crop_sizes or [])
        return sizes, [(0.2 * s / size, 1.0 * s / size) for s in sizes]

    def teacher_outputs(self, views):
        return {"key": self.teacher_embed(views[1])}

    def student_loss(self, views, teacher):
        p, key = self.params, teacher["key"]
        features, query = self.student_embed(views[0])
        rows = [ressl_terms(query, key, self.queue, p.student_temperature, p.teacher_temperature)]
        for crop in views[2:]:
            _, q_crop = self.student_embed(crop)
            rows.append(ressl_terms(q_crop, key, self.queue, p.student_temperature, p.teacher_temperature))
        loss = tf.add_n([tf.reduce_sum(r) for r in rows]) / (self.global_batch(query) * len(rows))
        return loss, {"features": features, "z": query, "enqueue": [(self.queue, self.queue_ptr, key)]}
