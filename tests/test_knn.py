"""Weighted kNN equals a brute-force float64 numpy reference (ranking, top-1, top-5), chunked and unchunked."""
import numpy as np
import pytest

from tfssl.eval.knn import knn_accuracy, knn_report, weighted_knn


def reference(bank, bank_y, queries, num_classes, k, t):
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    ranks = []
    for q in queries.astype(np.float64):
        sims = bank.astype(np.float64) @ q
        nearest = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for j in nearest:
            scores[bank_y[j]] += 1.0 if t is None else np.exp(sims[j] / t)
        ranks.append(np.argsort(-scores, kind="stable"))
    return np.array(ranks)


@pytest.mark.parametrize("chunk", [7, 1024])
@pytest.mark.parametrize("k,t", [(1, 0.1), (20, 0.07), (200, 0.1), (20, None), (5, None)])
def test_weighted_knn_matches_numpy(chunk, k, t):
    rng = np.random.default_rng(k)
    bank, bank_y = rng.standard_normal((300, 16)).astype("float32"), rng.integers(0, 7, 300)
    queries, query_y = rng.standard_normal((50, 16)).astype("float32"), rng.integers(0, 7, 50)
    ours = weighted_knn(bank, bank_y, queries, 7, k, t, chunk)
    ref = reference(bank, bank_y, queries, 7, min(k, 300), t)
    np.testing.assert_array_equal(ours[:, :5], ref[:, :5])
    acc = knn_accuracy(bank, bank_y, queries, query_y, 7, k, t, chunk)
    assert acc["top1"] == pytest.approx(np.mean(ref[:, 0] == query_y))
    assert acc["top5"] == pytest.approx(np.mean((ref[:, :5] == query_y[:, None]).any(1)))


def test_knn_finds_separable_clusters():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 32)) * 10
    y = rng.integers(0, 5, 400)
    x = (centres[y] + rng.standard_normal((400, 32))).astype("float32")
    assert knn_accuracy(x[:300], y[:300], x[300:], y[300:], 5, k=20)["top1"] == 1.0


def test_knn_report_has_both_protocols():
    rng = np.random.default_rng(3)
    bank, bank_y = rng.standard_normal((200, 8)).astype("float32"), rng.integers(0, 4, 200)
    queries, query_y = rng.standard_normal((40, 8)).astype("float32"), rng.integers(0, 4, 40)
    report = knn_report(bank, bank_y, queries, query_y, 4, k=50, temperature=0.1, majority_k=7, chunk=9)
    ref = reference(bank, bank_y, queries, 4, 7, None)
    assert report["majority"]["k"] == 7 and report["weighted"]["k"] == 50
    assert report["majority"]["top1"] == pytest.approx(np.mean(ref[:, 0] == query_y))
    assert report["weighted"] == {**knn_accuracy(bank, bank_y, queries, query_y, 4, 50, 0.1), "k": 50,
                                  "temperature": 0.1}
