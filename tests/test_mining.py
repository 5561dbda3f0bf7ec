"""Neighbour mining for CsMl: exact top-k vs a float64 reference, tie rule, replicas, label agreement, callback."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl.mining import (NeighbourMiner, distributed_topk, embed_dataset, mine_neighbours,
                          neighbour_label_agreement, topk_neighbours)


def reference_topk(x, k):
    """Brute force in float64: sort every row's other rows by (-cosine, index)."""
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    n = len(x)
    out = np.empty((n, k), np.int64)
    for i in range(n):
        others = np.delete(np.arange(n), i)
        order = np.lexsort((others, -sims[i, others]))          # last key is primary
        out[i] = others[order[:k]]
    return out, sims


@pytest.mark.parametrize("n,d,k,qc,bc", [
    (37, 8, 5, 10, 7),       # neither chunk divides N
    (50, 16, 3, 64, 100),    # chunks larger than N
    (20, 4, 19, 3, 2),       # k = N-1, bank chunk < k
    (64, 32, 5, 16, 16),     # chunks divide N
    (9, 2, 4, 1, 1),         # one row per chunk
])
def test_topk_matches_float64_reference(n, d, k, qc, bc):
    x = np.random.default_rng(n * 100 + d).normal(size=(n, d)).astype(np.float32) * 3.0   # not unit norm
    want, sims = reference_topk(x, k)
    idx, vals = topk_neighbours(x, k, query_chunk=qc, bank_chunk=bc, return_similarities=True)
    assert idx.dtype == tf.int32 and idx.shape == (n, k)
    idx = idx.numpy()
    np.testing.assert_allclose(vals.numpy(), np.take_along_axis(sims, want, 1), atol=1e-5)
    same = (idx == want).all(axis=1)
    for i in np.flatnonzero(~same):           # only a float32 near-tie could differ: then values must agree
        np.testing.assert_allclose(sims[i, idx[i]], sims[i, want[i]], atol=1e-6)
    assert same.mean() == 1.0
    assert not (idx == np.arange(n)[:, None]).any()
    assert np.all(np.diff(vals.numpy(), axis=1) <= 0)


def test_topk_inside_tf_function_and_distributed_topk_default_strategy():
    x = np.random.default_rng(1).normal(size=(30, 6)).astype(np.float32)
    want, _ = reference_topk(x, 4)
    fn = tf.function(lambda e: topk_neighbours(e, 4, query_chunk=7, bank_chunk=11))
    np.testing.assert_array_equal(fn(tf.constant(x)).numpy(), want)
    np.testing.assert_array_equal(distributed_topk(x, 4, query_chunk=7, bank_chunk=11), want)


def test_tie_rule_lowest_index_and_duplicates_of_self():
    # rows 0, 2, 5 identical; rows 1, 3 identical; row 4 halfway (equal cosine to both groups)
    x = np.array([[1, 0], [0, 1], [2, 0], [0, 3], [1, 1], [5, 0]], np.float32)
    for qc, bc in [(1, 1), (2, 3), (4, 2), (64, 64)]:
        idx, vals = topk_neighbours(x, 3, query_chunk=qc, bank_chunk=bc, return_similarities=True)
        idx = idx.numpy()
        np.testing.assert_array_equal(idx[0], [2, 5, 4])        # duplicates of self first, by index
        np.testing.assert_array_equal(idx[5], [0, 2, 4])
        np.testing.assert_array_equal(idx[1], [3, 4, 0])
        np.testing.assert_array_equal(idx[4], [0, 1, 2])        # five equal similarities: lowest indices
        np.testing.assert_allclose(vals.numpy()[0, :2], 1.0, atol=1e-6)
        assert not (idx == np.arange(6)[:, None]).any()
    # all rows identical: neighbours are the lowest other indices
    np.testing.assert_array_equal(topk_neighbours(np.ones((4, 3)), 2, 1, 2).numpy(), [[1, 2], [0, 2], [0, 1], [0, 1]])


def test_errors():
    with pytest.raises(ValueError, match="more than k"):
        topk_neighbours(np.ones((5, 3)), k=5)
    with pytest.raises(ValueError, match="more than k"):
        distributed_topk(np.ones((2, 3)), k=3)
    with pytest.raises(ValueError, match="rank 2"):
        topk_neighbours(np.ones((4, 3, 2)), k=1)
    with pytest.raises(ValueError, match="rank 2"):
        topk_neighbours(np.ones(8), k=1)
    dynamic = tf.function(lambda e: topk_neighbours(e, 3), input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    assert dynamic(tf.ones([4, 2])).shape == (4, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="N > k"):
        dynamic(tf.ones([3, 2]))


def _tiny_embedder(seed=0):
    """Both kernels seeded: with an unseeded convolution an image could now and then map to all-zero ReLU outputs,
    hence a zero embedding, whose float reference normalisation is NaN (a flaky test, not a mining bug)."""
    return keras.Sequential([keras.Input((6, 6, 1)),
                             keras.layers.Conv2D(4, 3, activation="relu",
                                                 kernel_initializer=keras.initializers.GlorotUniform(seed + 100)),
                             keras.layers.Flatten(), keras.layers.Dense(8, kernel_initializer=keras.initializers
                                                                        .GlorotNormal(seed))])


def _dataset(n=23, batch=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n, 6, 6, 1)).astype(np.float32)
    labels = rng.integers(-1, 3, size=n).astype(np.int64)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch), images, labels


def test_mine_neighbours_two_replicas_equal_one(mirrored):
    ds, images, labels = _dataset(n=23, batch=5)            # last batch of 3: not a multiple of 2 nor of 5
    with mirrored.scope():
        model = _tiny_embedder()
    embed = lambda x: model(x, training=False)  # noqa: E731
    one, y1 = mine_neighbours(embed, ds, k=4, strategy=tf.distribute.get_strategy(), query_chunk=4, bank_chunk=6)
    two, y2 = mine_neighbours(embed, ds, k=4, strategy=mirrored, query_chunk=4, bank_chunk=6)
    assert one.dtype == np.int32 and one.shape == (23, 4)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(y1, labels)
    np.testing.assert_array_equal(y2, labels)
    feats2, _ = embed_dataset(embed, ds, mirrored)
    direct = model(images, training=False).numpy()
    assert np.linalg.norm(direct, axis=1).min() > 1e-3          # the test's premise: no zero embedding
    np.testing.assert_allclose(feats2, direct / np.linalg.norm(direct, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(one, reference_topk(direct, 4)[0])


def test_distributed_topk_more_replicas_rows_than_needed(mirrored):
    x = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)     # replica 1 gets 1 row, padded
    np.testing.assert_array_equal(distributed_topk(x, 2, mirrored, 1, 1), reference_topk(x, 2)[0])


def test_neighbour_label_agreement():
    table = np.array([[1, 2], [0, 3], [0, 1], [2, 1]])
    labels = np.array([0, 0, 1, -1])
    # valid pairs: (0,1) eq, (0,2) ne, (1,0) eq, (2,0) ne, (2,1) ne; anchor 3 and neighbour 3 ignored
    assert neighbour_label_agreement(table, labels) == pytest.approx(2 / 5)
    assert neighbour_label_agreement(table, np.array([-1, -1, -1, 2])) is None
    assert neighbour_label_agreement(table, np.array([4, 4, 4, 4])) == 1.0


class TinySSL(keras.Model):
    """A 'method' with a backbone and a trivial train_step (the miner only needs ``backbone``)."""

    def __init__(self):
        super().__init__(name="tiny_ssl")
        self.backbone = _tiny_embedder(seed=1)
        self.backbone.build((None, 6, 6, 1))

    def call(self, x, training=False):
        return self.backbone(x, training=training)

    def train_step(self, data):
        return {"loss": tf.constant(0.0)}


def test_neighbour_miner_callback():
    mine_ds, images, labels = _dataset(n=17, batch=4, seed=2)
    table = tf.Variable(tf.zeros([17, 3], tf.int32))
    logged = []
    miner = NeighbourMiner(mine_ds, table, every=2, k=3, query_chunk=5, bank_chunk=8, log=logged.append)
    model = TinySSL()
    model.compile()
    seen = {}
    snapshot = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.setdefault(e, table.numpy()))
    model.fit(tf.data.Dataset.from_tensor_slices(images).batch(8), epochs=3, verbose=0, callbacks=[miner, snapshot])
    assert [h["epoch"] for h in miner.history] == [0, 2] and len(logged) == 2
    feats = model.backbone(images, training=False).numpy()
    want = reference_topk(feats, 3)[0]
    np.testing.assert_array_equal(table.numpy(), want)
    np.testing.assert_array_equal(seen[0], want)           # assigned before epoch 0's batches
    for h in miner.history:
        assert h["num_images"] == 17 and h["seconds"] > 0
        assert h["agreement"] == pytest.approx(neighbour_label_agreement(want, labels))
    assert "epoch 2" in logged[1]

    bad = NeighbourMiner(mine_ds, tf.Variable(tf.zeros([16, 3], tf.int32)), every=1, k=3)
    bad.set_model(model)
    with pytest.raises(ValueError, match="17 images.*16 rows"):
        bad.on_epoch_begin(0)
    with pytest.raises(ValueError, match="int32"):
        NeighbourMiner(mine_ds, tf.Variable(tf.zeros([17, 2], tf.int32)), k=3)


def test_neighbour_miner_uses_model_strategy_and_teacher(mirrored):
    mine_ds, images, _ = _dataset(n=15, batch=4, seed=4)
    with mirrored.scope():
        model = TinySSL()
        model.teacher_backbone = _tiny_embedder(seed=7)
    assert model.distribute_strategy is mirrored
    table = tf.Variable(tf.zeros([15, 2], tf.int32))
    miner = NeighbourMiner(mine_ds, table, every=3, k=2, labels=False, log=lambda line: None)
    miner.set_model(model)
    for epoch in range(4):                                  # called outside fit: mines at 0 and 3 only
        miner.on_epoch_begin(epoch)
    assert [h["epoch"] for h in miner.history] == [0, 3] and miner.history[0]["agreement"] is None
    np.testing.assert_array_equal(table.numpy(), reference_topk(model.teacher_backbone(images).numpy(), 2)[0])
