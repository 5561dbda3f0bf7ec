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


# ----------------------------------------------------------------------------------------------------- WCL
def nearest_neighbour(embeddings):
    """Index of each row's most cosine-similar *other* row. [B,D] → int32 [B].

    Tie rule: exact duplicates (bit-identical input rows, found by :func:`_row_hash`) are each other's nearest,
    so a duplicated row points to the lowest-index other copy; otherwise the highest float32 similarity wins and
    among exactly equal values the lowest index. (Without the duplicate rule, the matmul rounds the similarities of
    identical rows differently at different positions.) The similarity matrix is symmetrised, which with the tie
    rule guarantees that every cycle of the 1-NN graph is a mutual pair. NaN similarities count as −2 (never
    nearest). A single row points to itself.
    """
    x = tf.cast(embeddings, tf.float32)
    e = tf.math.l2_normalize(x, axis=1)
    n = tf.shape(e)[0]
    sim = tf.matmul(e, e, transpose_b=True)
    sim = (sim + tf.transpose(sim)) / 2.0                    # exactly symmetric: a+b == b+a in floating point
    h1, h2 = _row_hash(x)
    sim = tf.where(tf.equal(h1[:, None], h1[None, :]) & tf.equal(h2[:, None], h2[None, :]), 2.0, sim)
    sim = tf.where(tf.math.is_nan(sim), -2.0, sim)
    sim = tf.where(tf.eye(n, dtype=tf.bool), -3.0, sim)     # never oneself (unless alone)
    best = tf.reduce_max(sim, axis=1, keepdims=True)
    columns = tf.range(n, dtype=tf.int32)[None, :]
    return tf.reduce_min(tf.where(sim >= best, columns, n), axis=1)


def _row_hash(x):
    """Two exact int64 hashes of each float32 row's bits (16-bit halves times fixed 16-bit weights: no overflow).

    Equal rows give equal hashes; different rows collide on both with probability ~2⁻³², used only to find exact
    duplicates. x: [B,D] float32 → ([B], [B]) int64.
    """
    bits = tf.bitcast(x, tf.int32)
    halves = tf.cast(tf.concat([tf.bitwise.bitwise_and(bits, 0xFFFF),
                                tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 16), 0xFFFF)], axis=1), tf.int64)
    d = tf.shape(halves)[1]
    position = tf.cast(tf.range(d), tf.int64)
    w1 = (position * 40503 + 12345) % 65521 + 1              # two fixed pseudo-random weight rows in [1, 65521]
    w2 = (position * 2654435 + 977) % 65519 + 1
    return tf.reduce_sum(halves * w1, axis=1), tf.reduce_sum(halves * w2, axis=1)


def components(neighbour):
    """Connected components of the undirected graph {i — neighbour[i]} as ids 0…C−1 (ordered by the component's
    smallest mutual-pair index), for a 1-NN graph whose cycles are mutual pairs (as :func:`nearest_neighbour`
    returns). Pointer jumping p ← p[p] for ⌈log2 B⌉+1 rounds brings every node onto its component's pair {a, b};
    min(p, neighbour[p]) = min(a, b) then names the component. Gathers only: runs eagerly, in graphs and in XLA.
    """
    neighbour = tf.cast(neighbour, tf.int32)
    n = tf.shape(neighbour)[0]
    rounds = tf.cast(tf.math.ceil(tf.math.log(tf.cast(tf.maximum(n, 2), tf.float32)) / tf.math.log(2.0)), tf.int32) + 1
    _, p = tf.while_loop(lambda i, p: i < rounds, lambda i, p: (i + 1, tf.gather(p, p)), (0, neighbour))
    root = tf.minimum(p, tf.gather(neighbour, p))
    is_root = tf.cast(tf.equal(root, tf.range(n, dtype=tf.int32)), tf.int32)
    return tf.gather(tf.cumsum(is_root) - 1, root)


def weak_labels(embeddings):
    """WCL weak labels (Zheng et al. 2021, §3.2): connected components of the undirected 1-NN cosine graph.

    [B,D] → int32 [B] with ids 0…C−1; every component of B ≥ 2 rows has at least two members. No gradient.
    """
    return tf.stop_gradient(components(nearest_neighbour(tf.stop_gradient(embeddings))))


def component_stats(labels, classes=None):
    """(number of components, mean component size, weak-label precision) of weak ``labels`` [B].

    Precision = fraction of same-component pairs (i ≠ j, both with a class ≥ 0) whose true ``classes`` agree; NaN-free
    (1.0 when there is no such pair). ``classes`` is for monitoring only; without it precision is returned as −1.
    """
    labels = tf.cast(labels, tf.int32)
    n = tf.cast(tf.size(labels), tf.float32)
    count = tf.cast(tf.reduce_max(labels) + 1, tf.float32)
    if classes is None:
        return count, n / count, tf.constant(-1.0)
    classes = tf.cast(classes, tf.int32)
    known = classes >= 0
    pair = tf.equal(labels[:, None], labels[None, :]) & ~tf.eye(tf.size(labels), dtype=tf.bool)
    pair &= known[:, None] & known[None, :]
    agree = pair & tf.equal(classes[:, None], classes[None, :])
    pairs = tf.reduce_sum(tf.cast(pair, tf.float32))
    precision = tf.where(pairs > 0, tf.reduce_sum(tf.cast(agree, tf.float32)) / tf.maximum(pairs, 1.0), 1.0)
    return count, n / count, precision


def sup_contrastive_terms(queries, keys, query_labels, key_labels, temperature, self_index=None):
    """Supervised contrastive terms (WCL eq. 5 form) of each query row against the keys:

    ℓ_i = −(1/|P_i|) Σ_{j∈P_i} [q_i·k_j/τ − log Σ_{k≠s(i)} exp(q_i·k_k/τ)],  P_i = {j ≠ s(i): label_j = label_i}.

    ``self_index`` [N] (or None) is the key column of the query itself, excluded from positives and denominator.
    Rows without any positive give 0. Gradient flows into whatever is not stopped by the caller. Returns [N].
    """
    logits = tf.matmul(queries, keys, transpose_b=True) / temperature
    positive = tf.equal(query_labels[:, None], key_labels[None, :])
    if self_index is not None:
        is_self = tf.one_hot(self_index, tf.shape(keys)[0], on_value=True, off_value=False)
        logits = tf.where(is_self, tf.constant(_MASKED, logits.dtype), logits)
        positive &= ~is_self
    log_prob = logits - tf.reduce_logsumexp(logits, axis=1, keepdims=True)
    count = tf.reduce_sum(tf.cast(positive, logits.dtype), axis=1)
    total = tf.reduce_sum(tf.where(positive, log_prob, tf.zeros_like(log_prob)), axis=1)
    return -total / tf.maximum(count, 1.0)


def wcl_graph_terms(h1, h2, h1_all, h2_all, labels1, labels2, offset, temperature=0.1):
    """Per-anchor swapped graph terms of the local rows (h1 then h2) against the gathered, stopped keys. [2b].

    View 1 contrasts within view 1 with positives from view 2's graph (``labels2``) and vice versa; the local row i
    is global row ``offset + i`` (its own key column, excluded).
    """
    idx = tf.range(tf.shape(h1)[0], dtype=tf.int32) + tf.cast(offset, tf.int32)
    t1 = sup_contrastive_terms(h1, tf.stop_gradient(h1_all), tf.gather(labels2, idx), labels2, temperature, idx)
    t2 = sup_contrastive_terms(h2, tf.stop_gradient(h2_all), tf.gather(labels1, idx), labels1, temperature, idx)
    return tf.concat([t1, t2], axis=0)


def wcl_graph_loss(h1, h2, temperature=0.1):
    """WCL graph loss (METHODS.md WCL step 3): L = (L_sup(h1, sg(h1), mask(h2)) + L_sup(h2, sg(h2), mask(h1))) / 2.

    h1, h2: L2-normalised graph-head embeddings [B,D] of the two views of the full (gathered) batch; masks are
    the weak labels (:func:`weak_labels`) of the other view; self is excluded from positives and denominator.
    """
    terms = wcl_graph_terms(h1, h2, h1, h2, weak_labels(h1), weak_labels(h2), 0, temperature)
    return tf.reduce_mean(terms)


def knn_crop_terms(u, s, anchor, owner, z_all, h1_all, h2_all, labels1, labels2, keep, temperature=0.1,
                   graph_temperature=0.1):
    """KNN multi-crop terms of WCL (paper §3.4; *tfssl's reconstruction*, not in the released code).

    u, s: [b, m, D] instance / graph embeddings of m small crops of each local image; anchor [b, D]: mean graph
    embedding of the image's two large views; owner [b]: the image's global row; z_all [2B, D]: gathered instance
    embeddings of view 1 then view 2; h1_all, h2_all [B, D]: gathered graph embeddings; labels1/2 [B]: weak labels.
    Per image the ``keep`` crops with the highest s·sg(anchor) are kept. A crop's term is
    ℓ_inst + (ℓ_graph(H1, labels2) + ℓ_graph(H2, labels1)) / 2 with ℓ = :func:`sup_contrastive_terms`: instance
    positives are its image's two large views among all 2B; graph positives are its image's weak-label component of
    the other view (the image itself included). Keys h*_all are stopped. Returns (terms [b·m], kept [b·m] 0/1).
    """
    b, m = tf.shape(u)[0], u.shape[1]
    score = tf.einsum("bmd,bd->bm", tf.stop_gradient(s), tf.stop_gradient(anchor))
    kept = tf.reduce_sum(tf.one_hot(tf.math.top_k(score, keep).indices, m, dtype=u.dtype), axis=1)
    rows = tf.repeat(tf.cast(owner, tf.int32), m)                          # crop row → its image's global row
    u, s = tf.reshape(u, [b * m, -1]), tf.reshape(s, [b * m, -1])
    images = tf.range(tf.shape(h1_all)[0], dtype=tf.int32)
    instance = sup_contrastive_terms(u, z_all, rows, tf.concat([images, images], 0), temperature)
    graph = (sup_contrastive_terms(s, tf.stop_gradient(h1_all), tf.gather(labels2, rows), labels2, graph_temperature)
             + sup_contrastive_terms(s, tf.stop_gradient(h2_all), tf.gather(labels1, rows), labels1,
                                     graph_temperature)) / 2.0
    return instance + graph, tf.reshape(kept, [-1])


# ----------------------------------------------------------------------------------------------------- CsMl
def csml_terms(qi, qj, qm, ki, kj, queue, temperature, w0, w1, lam_prime):
    """CsMl loss per anchor (METHODS.md CsMl step 5), with ℓ(q, k) = :func:`info_nce_terms` (queue as negatives):

    L = [w0·ℓ(qi,ki) + w1·ℓ(qi,kj) + w0·ℓ(qj,kj) + w1·ℓ(qj,ki) + λ′·ℓ(qm,ki) + (1−λ′)·ℓ(qm,kj)] / 3.

    qi, qj, qm [B,D]: student embeddings of the anchor's, the neighbour's and the CutMix view (:mod:`tfssl.cutmix`);
    ki, kj [B,D]: teacher keys of the anchor and the neighbour; queue [K,D]; all L2-normalised. Keys and queue carry
    no gradient (stopped here). (w0, w1) = (1, 0) during the warm-up epochs 0–10, (0.5, 0.5) afterwards; the mix term
    is on from epoch 0 with λ′ = the anchor's kept pixel fraction. w0, w1, lam_prime: python floats or scalar
    tensors. Only ki is enqueued afterwards — by the method, not here. Returns [B] in the dtype of qi.
    """
    ki, kj, queue = tf.stop_gradient(ki), tf.stop_gradient(kj), tf.stop_gradient(queue)
    # dtype_hint: a python float goes straight to qi's dtype (tf.cast would round it through float32 first)
    w0, w1, lam = (tf.cast(tf.convert_to_tensor(w, dtype_hint=qi.dtype), qi.dtype) for w in (w0, w1, lam_prime))

    def ell(q, k):
        return info_nce_terms(q, k, queue, temperature)

    total = (w0 * ell(qi, ki) + w1 * ell(qi, kj) + w0 * ell(qj, kj) + w1 * ell(qj, ki)
             + lam * ell(qm, ki) + (1.0 - lam) * ell(qm, kj))
    return total / 3.0


def csml_loss(qi, qj, qm, ki, kj, queue, temperature, w0, w1, lam_prime):
    """CsMl loss (METHODS.md CsMl step 5): batch mean of :func:`csml_terms` (the released recipe uses τ = 0.2).

    No defaults: the phase weights (w0, w1) and λ′ change during training and must be passed explicitly.
    """
    return tf.reduce_mean(csml_terms(qi, qj, qm, ki, kj, queue, temperature, w0, w1, lam_prime))
