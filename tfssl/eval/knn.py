"""kNN classification of frozen features (METHODS.md, "Evaluation protocols").

* Weighted cosine kNN (Wu et al. 2018, InstDisc's monitor, which MoCo's code kept): the bank's k most
  cosine-similar features vote for their classes with weight exp(s/τ); classes are ranked by total weight (k = 200,
  τ = 0.1, InstDisc's values; solo-learn's monitor uses k = 20, τ = 0.07). ReSSL, WCL and CsMl publish no kNN
  protocol (CsMl's k = 5 is its neighbour mining).
* Plain majority kNN (k = 20): one vote per neighbour; equal counts are ranked by the lower class index.

Test rows are processed in chunks so the similarity matrix never exceeds ``chunk × bank`` floats (1024 × 1.28 M ×
4 B ≈ 5 GB is the ImageNet worst case; lower ``chunk`` to fit).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf


def embed(backbone, dataset):
    """(features [N,D] float32, labels [N]) of a dataset of (images in [0,1], labels) batches, inference mode."""
    forward = tf.function(lambda x: backbone(x, training=False), reduce_retracing=True)
    feats, labels = [], []
    for images, y in dataset:
        feats.append(forward(images).numpy())
        labels.append(np.asarray(y))
    return np.concatenate(feats).astype("float32"), np.concatenate(labels)


def weighted_knn(bank, bank_labels, queries, num_classes, k=200, temperature=0.1, chunk=1024):
    """Class ranking [N, C] (best first) of each query by exp(s/τ)-weighted votes of its k nearest bank rows.

    ``temperature=None`` gives every neighbour one vote (majority kNN)."""
    bank = tf.math.l2_normalize(tf.constant(bank, tf.float32), axis=1)
    bank_labels = tf.constant(bank_labels, tf.int32)
    k = min(k, int(bank.shape[0]))
    ranks = []
    for start in range(0, len(queries), chunk):
        q = tf.math.l2_normalize(tf.constant(queries[start:start + chunk], tf.float32), axis=1)
        sims, idx = tf.math.top_k(tf.matmul(q, bank, transpose_b=True), k=k)
        weights = tf.ones_like(sims) if temperature is None else tf.exp(sims / temperature)
        votes = tf.one_hot(tf.gather(bank_labels, idx), num_classes) * weights[..., None]
        scores = tf.reduce_sum(votes, axis=1)
        ranks.append(tf.argsort(scores, axis=1, direction="DESCENDING", stable=True).numpy())
    return np.concatenate(ranks) if ranks else np.zeros((0, num_classes), np.int64)


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, k=200, temperature=0.1, chunk=1024):
    """{'top1', 'top5'} accuracy (fractions) of :func:`weighted_knn`."""
    ranks = weighted_knn(bank, bank_labels, queries, num_classes, k, temperature, chunk)
    hit = ranks[:, :5] == np.asarray(query_labels)[:, None]
    return {"top1": float(np.mean(hit[:, 0])), "top5": float(np.mean(hit.any(axis=1)))}


def knn_report(bank, bank_labels, queries, query_labels, num_classes, k=200, temperature=0.1, majority_k=20,
               chunk=1024):
    """Both kNN protocols: {"weighted": {top1, top5, k, temperature}, "majority": {top1, top5, k}}."""
    weighted = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, k, temperature, chunk)
    majority = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, majority_k, None, chunk)
    return {"weighted": {**weighted, "k": k, "temperature": temperature}, "majority": {**majority, "k": majority_k}}
