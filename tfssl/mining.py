"""Nearest-neighbour mining for CsMl (METHODS.md, "CsMl" 1): exact cosine top-k of every training image.

Every ``every`` epochs (from epoch 0, the random network) :class:`NeighbourMiner` embeds a centre view of every
training image with the teacher backbone, L2-normalises, and writes the exact top-k table (self excluded, no
threshold) into an int32 ``tf.Variable`` [N, k] that the data pipeline reads to draw cross-sample positives.

Algorithm: queries in chunks of ``query_chunk`` rows; for each, the bank is scanned in chunks of ``bank_chunk``
rows. Each block ``q · bᵀ`` keeps its top ``k+1`` (one slot may be the query itself, then dropped by index), merged
into a running top-k by ``concat(running, new)`` + ``tf.math.top_k``. Both loops are ``tf.while_loop`` s, so the
whole scan is traced once. Under a ``tf.distribute`` strategy with R replicas the forward runs in ``strategy.run``
(each replica embeds 1/R of every batch) and each replica scores ceil(N/R) query rows against the full bank.

Cost (N = 1,281,167 ImageNet-1k training images): 2·N²·D flops = 6.7 PFLOP for D = 2048 (ResNet-50 pooled) and
1.7 PFLOP for D = 512 (ResNet-18), i.e. ~8 / ~2 GPU-minutes at 14 TFLOP/s fp32, divided by the replicas. On the
2-core dev CPU ``bench/mining_cost.py`` measured 36 / 28 GFLOP/s (matmul-bound; top_k adds ~20% at D = 512), i.e.
~51 h / ~16 h for ImageNet: mine ImageNet on accelerators only. Memory:

* embeddings N×D float32: 10.5 GB (9.8 GiB) for D = 2048, 2.6 GB (2.4 GiB) for D = 512. They are assembled on the
  host (up to 2 copies during the tensor conversion) and the bank is mirrored to every replica, so D = 2048 needs
  ≥ 16 GB devices (or a CPU-only strategy); D = 512 fits anywhere.
* similarity block query_chunk × bank_chunk × 4 B: 1024 × 65536 → 268 MB (256 MiB) per replica (plus, if the
  runtime copies the bank slice, bank_chunk × D × 4 B = 537 MB for D = 2048 / 134 MB for D = 512). Halve
  ``bank_chunk`` to halve both; the chunks, not N, bound the scratch memory.
* running top-k: query_chunk × k × 8 B (values + indices) = 40 KB, the block's top-(k+1) the same; the table
  N × k int32 = 25.6 MB (k = 5).
"""
from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from tfssl.distribute import gather, replica_id


def _topk_rows(bank, start, stop, k, query_chunk, bank_chunk):
    """Top-k (values, int32 indices) of rows ``bank[start:stop]`` against all of ``bank``, self excluded by index."""
    n = tf.shape(bank)[0]
    neg_inf = tf.constant(-np.inf, tf.float32)

    def scan_bank(q, rows):
        def body(b0, run_v, run_i):
            block = tf.matmul(q, bank[b0:b0 + bank_chunk], transpose_b=True)          # [q, <= bank_chunk]
            v, i = tf.math.top_k(block, tf.minimum(k + 1, tf.shape(block)[1]))
            i = i + b0
            v = tf.where(tf.equal(i, rows[:, None]), neg_inf, v)                      # drop self by index
            # running first: its indices are lower, so top_k's "lower position first" is "lower index first"
            v, pos = tf.math.top_k(tf.concat([run_v, v], 1), k)
            return b0 + bank_chunk, v, tf.gather(tf.concat([run_i, i], 1), pos, batch_dims=1)

        m = tf.shape(q)[0]
        init = (tf.constant(0), tf.fill([m, k], neg_inf), tf.fill([m, k], -1))
        shapes = (tf.TensorShape([]), tf.TensorShape([None, k]), tf.TensorShape([None, k]))
        _, v, i = tf.while_loop(lambda b0, *_: b0 < n, body, init, shape_invariants=shapes)
        return v, i

    def body(q0, step, vals, idxs):
        q1 = tf.minimum(q0 + query_chunk, stop)
        v, i = scan_bank(bank[q0:q1], tf.range(q0, q1))
        return q1, step + 1, vals.write(step, v), idxs.write(step, i)

    def array(dtype):  # element 0 is an empty [0, k] block, so concat works when this replica has no rows
        return tf.TensorArray(dtype, size=1, dynamic_size=True, infer_shape=False,
                              element_shape=tf.TensorShape([None, k])).write(0, tf.zeros([0, k], dtype))

    init = (start, tf.constant(1), array(tf.float32), array(tf.int32))
    _, _, vals, idxs = tf.while_loop(lambda q0, *_: q0 < stop, body, init)
    vals, idxs = vals.concat(), idxs.concat()
    return vals, idxs


@tf.function(reduce_retracing=True, autograph=False)
def _topk_all(bank, k, query_chunk, bank_chunk):
    """Compiled :func:`_topk_rows` over all rows (k and chunk sizes are Python ints: one trace per setting)."""
    return _topk_rows(bank, 0, tf.shape(bank)[0], k, query_chunk, bank_chunk)


def _check(shape, k, query_chunk, bank_chunk):
    if shape.rank != 2:
        raise ValueError(f"embeddings must be rank 2 [N, D], got shape {shape}")
    if min(k, query_chunk, bank_chunk) < 1:
        raise ValueError(f"k, query_chunk and bank_chunk must be >= 1, got {k}, {query_chunk}, {bank_chunk}")
    if shape[0] is not None and shape[0] <= k:
        raise ValueError(f"top-{k} neighbours need more than k={k} rows (self is excluded), got N={shape[0]}")


def topk_neighbours(embeddings, k=5, query_chunk=1024, bank_chunk=65536, return_similarities=False):
    """Exact cosine top-k of every row of ``embeddings`` [N, D] among all *other* rows.

    Rows are L2-normalised inside (float32). Returns int32 indices [N, k] sorted by decreasing similarity (and the
    float32 similarities [N, k] if ``return_similarities``). Self is excluded by index only: an exact duplicate of
    row i at j != i is a valid neighbour (similarity 1). Ties: highest similarity first, then lowest index.
    Scratch memory is one ``query_chunk × bank_chunk`` float32 block. Works eagerly and inside ``tf.function``
    (one trace per k / chunk sizes). Raises ValueError if the input is not rank 2 or N <= k.
    """
    x = tf.convert_to_tensor(embeddings)
    _check(x.shape, k, query_chunk, bank_chunk)
    bank = tf.math.l2_normalize(tf.cast(x, tf.float32), axis=1)
    if x.shape[0] is None:                       # unknown N inside a tf.function: check when it runs
        with tf.control_dependencies([tf.debugging.assert_greater(tf.shape(x)[0], k, "top-k needs N > k rows")]):
            bank = tf.identity(bank)
    vals, idxs = _topk_all(bank, int(k), int(query_chunk), int(bank_chunk))
    return (idxs, vals) if return_similarities else idxs


def embed_dataset(embed_fn, dataset, strategy=None):
    """L2-normalised float32 embeddings [N, D] and labels [N] (numpy) of (images, labels) batches, in order.

    Each batch is zero-padded to one fixed size (a multiple of the replica count, so one trace) and split evenly
    over the replicas; ``embed_fn`` runs under ``strategy.run``, the rows are all-gathered and the padding dropped.
    """
    strategy = strategy or tf.distribute.get_strategy()
    reps = strategy.num_replicas_in_sync

    def replica_fn(x):
        f = tf.cast(embed_fn(x), tf.float32)
        return gather(tf.math.l2_normalize(tf.reshape(f, [tf.shape(f)[0], -1]), axis=1))

    forward = tf.function(lambda x: strategy.run(replica_fn, args=(x,)), autograph=False)
    feats, labels, size = [], [], None
    for images, y in dataset:
        images = tf.convert_to_tensor(images)
        b = int(images.shape[0])
        size = max(size or 0, -(-b // reps) * reps)
        padded = tf.pad(images, [[0, size - b]] + [[0, 0]] * (images.shape.rank - 1))
        per = size // reps
        dist = strategy.experimental_distribute_values_from_function(
            lambda ctx: padded[ctx.replica_id_in_sync_group * per:(ctx.replica_id_in_sync_group + 1) * per])
        feats.append(strategy.experimental_local_results(forward(dist))[0].numpy()[:b])
        labels.append(np.asarray(y))
    if not feats:
        raise ValueError("the mining dataset is empty")
    return np.concatenate(feats), np.concatenate(labels)


def distributed_topk(embeddings, k=5, strategy=None, query_chunk=1024, bank_chunk=65536):
    """:func:`topk_neighbours` with the query rows split over the replicas of ``strategy``; int32 numpy [N, k].

    Replica r scores rows [r·M, (r+1)·M) (M = ceil(N/R)) against the full bank; the rows are all-gathered in order.
    """
    strategy = strategy or tf.distribute.get_strategy()
    reps = strategy.num_replicas_in_sync
    bank = tf.math.l2_normalize(tf.convert_to_tensor(embeddings, tf.float32), axis=1)
    _check(bank.shape, k, query_chunk, bank_chunk)
    n = int(bank.shape[0])
    per = -(-n // reps)

    def replica_fn(bank):
        start = tf.minimum(replica_id() * per, n)
        stop = tf.minimum(start + per, n)
        _, idxs = _topk_rows(bank, start, stop, k, query_chunk, bank_chunk)
        return gather(tf.pad(idxs, [[0, per - (stop - start)], [0, 0]], constant_values=-1))

    out = tf.function(lambda b: strategy.run(replica_fn, args=(b,)), autograph=False)(bank)
    return strategy.experimental_local_results(out)[0].numpy()[:n]


def mine_neighbours(embed_fn, dataset, k=5, strategy=None, query_chunk=1024, bank_chunk=65536):
    """Embed ``dataset`` with ``embed_fn`` and mine the top-k table: (int32 numpy [N, k], labels numpy [N])."""
    feats, labels = embed_dataset(embed_fn, dataset, strategy)
    if not np.isfinite(feats).all():
        raise ValueError("non-finite embeddings: cannot mine neighbours (has training diverged?)")
    return distributed_topk(feats, k, strategy, query_chunk, bank_chunk), labels


def neighbour_label_agreement(table, labels):
    """Fraction of (anchor, neighbour) pairs with equal labels, skipping labels < 0; None if no labelled pair."""
    table, labels = np.asarray(table), np.asarray(labels)
    anchor, neigh = np.broadcast_to(labels[:, None], table.shape), labels[table]
    valid = (anchor >= 0) & (neigh >= 0)
    return float(np.mean(anchor[valid] == neigh[valid])) if valid.any() else None


class NeighbourMiner(keras.callbacks.Callback):
    """Mines the top-k neighbour table at the start of every ``every``-th epoch (epoch 0 included).

    Embeds ``dataset`` (fixed-order (images in [0,1], labels) batches, e.g. ``tfssl.data.eval_pipeline``) with the
    model's ``teacher_backbone`` (else ``backbone``) in inference mode under the model's strategy and assigns the
    table to ``table`` (int32 ``tf.Variable`` [N, k], created by the caller on the host). ``history`` gets one
    dict {"epoch", "agreement", "seconds", "num_images"} per mining; ``log`` gets one line.
    """

    def __init__(self, dataset, table, every=5, k=5, labels=True, query_chunk=1024, bank_chunk=65536, log=print):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if table.shape.rank != 2 or table.shape[1] != k or table.dtype != tf.int32:
            raise ValueError(f"table must be an int32 variable [N, k={k}], got {table.dtype.name} {table.shape}")
        self.dataset, self.table, self.every, self.k, self.labels = dataset, table, every, k, labels
        self.query_chunk, self.bank_chunk, self.log, self.history = query_chunk, bank_chunk, log, []

    def mine(self, epoch):
        """Mine now; returns the history entry."""
        t0 = time.perf_counter()
        backbone = getattr(self.model, "teacher_backbone", None)
        backbone = self.model.backbone if backbone is None else backbone
        strategy = getattr(self.model, "distribute_strategy", None) or tf.distribute.get_strategy()
        feats, labels = embed_dataset(lambda x: backbone(x, training=False), self.dataset, strategy)
        if feats.shape[0] != self.table.shape[0]:
            raise ValueError(f"the mining dataset has {feats.shape[0]} images but the neighbour table has "
                             f"{self.table.shape[0]} rows")
        if not np.isfinite(feats).all():
            raise ValueError(f"epoch {epoch}: non-finite embeddings, cannot mine neighbours")
        table = distributed_topk(feats, self.k, strategy, self.query_chunk, self.bank_chunk)
        self.table.assign(table)
        entry = {"epoch": int(epoch), "agreement": neighbour_label_agreement(table, labels) if self.labels else None,
                 "seconds": time.perf_counter() - t0, "num_images": int(feats.shape[0])}
        self.history.append(entry)
        agree = "n/a" if entry["agreement"] is None else f"{entry['agreement']:.3f}"
        self.log(f"NeighbourMiner: epoch {epoch}: top-{self.k} of {entry['num_images']} images in "
                 f"{entry['seconds']:.1f}s, label agreement {agree}")
        return entry

    def on_epoch_begin(self, epoch, logs=None):
        """Mine at every ``every``-th epoch, unless this epoch was already mined (e.g. by ``mine(0)`` before fit)."""
        if epoch % self.every == 0 and not any(h["epoch"] == epoch for h in self.history):
            self.mine(epoch)
