"""Losses as pure TensorFlow functions of L2-normalised embeddings (METHODS.md; no model, no strategy inside).

Each loss has a ``*_terms`` form returning one value per anchor row, so a method running on several replicas can
compute the terms of its local anchors against gathered candidates and divide their sum by the global count (see
:mod:`tfssl.distribute`); the public ``*_loss`` form is the batch mean on one device.
"""
from __future__ import annotations

import tensorflow as tf

_MASKED = -1e9  # finite stand-in for -inf: keeps logsumexp and its gradient finite under XLA


def contrastive_terms(anchors, candidates, positive_index, temperature, self_index=None):
    """ℓ_i = −log exp(a_i·c_{p(i)}/τ) / Σ_{k≠s(i)} exp(a_i·c_k/τ).

    anchors [N,D], candidates [M,D], positive_index [N] (column of the positive), self_index [N] or None (column
    excluded from the denominator, the anchor itself). Returns [N].
    """
    logits = tf.matmul(anchors, candidates, transpose_b=True) / temperature
    if self_index is not None:
        self_mask = tf.one_hot(self_index, tf.shape(candidates)[0], on_value=True, off_value=False)
        logits = tf.where(self_mask, tf.constant(_MASKED, logits.dtype), logits)
    positive = tf.gather(logits, positive_index, axis=1, batch_dims=1)
    return tf.reduce_logsumexp(logits, axis=1) - positive


def nt_xent_terms(z1, z2, z1_all, z2_all, offset, temperature):
    """SimCLR NT-Xent terms of the local anchors (rows of z1 then z2) against the 2B gathered views.

    Candidates are [z1_all; z2_all] (2B rows); local row i is global row ``offset + i``; its positive is the other
    view of the same image, every other of the 2B−1 views is in the denominator (2B−2 negatives). Returns [2b].
    """
    b = tf.shape(z1)[0]
    big_b = tf.shape(z1_all)[0]
    candidates = tf.concat([z1_all, z2_all], axis=0)
    idx = tf.range(b, dtype=tf.int32) + tf.cast(offset, tf.int32)
    self_index = tf.concat([idx, idx + big_b], axis=0)
    positive_index = tf.concat([idx + big_b, idx], axis=0)
    return contrastive_terms(tf.concat([z1, z2], 0), candidates, positive_index, temperature, self_index)


def nt_xent_loss(z1, z2, temperature=0.1):
    """NT-Xent (SimCLR, Chen et al. 2020, eq. 1) over 2B views, mean over the 2B anchors. z1, z2: [B,D]."""
    return tf.reduce_mean(nt_xent_terms(z1, z2, z1, z2, 0, temperature))


def info_nce_terms(query, key, queue, temperature):
    """MoCo InfoNCE per query: −log exp(q·k/τ) / (exp(q·k/τ) + Σ_{n∈queue} exp(q·n/τ)). Returns [B]."""
    positive = tf.reduce_sum(query * key, axis=1, keepdims=True) / temperature
    negatives = tf.matmul(query, queue, transpose_b=True) / temperature
    logits = tf.concat([positive, negatives], axis=1)
    return tf.reduce_logsumexp(logits, axis=1) - logits[:, 0]


def info_nce_loss(query, key, queue, temperature=0.2):
    """InfoNCE of MoCo (He et al. 2020, eq. 1): positive = matching key, negatives = the queue. Batch mean."""
    return tf.reduce_mean(info_nce_terms(query, key, queue, temperature))


def ressl_terms(student, teacher, queue, student_temperature=0.1, teacher_temperature=0.04):
    """ReSSL relation loss per image: −Σ_k p_t(k) log p_s(k) with p_t = softmax(sg(t)·Mᵀ/τt), p_s over s·Mᵀ/τs."""
    teacher_logits = tf.matmul(tf.stop_gradient(teacher), queue, transpose_b=True) / teacher_temperature
    p_teacher = tf.stop_gradient(tf.nn.softmax(teacher_logits, axis=1))
    log_p_student = tf.nn.log_softmax(tf.matmul(student, queue, transpose_b=True) / student_temperature, axis=1)
    return -tf.reduce_sum(p_teacher * log_p_student, axis=1)


def ressl_loss(student, teacher, queue, student_temperature=0.1, teacher_temperature=0.04):
    """ReSSL (Zheng et al. 2021, eq. 3): cross-entropy between the teacher's and the student's relation to the queue.

    student [B,D], teacher [B,D], queue [K,D], all L2-normalised; the teacher side carries no gradient; the current
    batch is not in the queue, so the positive is in neither distribution. Uses log_softmax (stable). Batch mean.
    """
    return tf.reduce_mean(ressl_terms(student, teacher, queue, student_temperature, teacher_temperature))
