"""Evaluation protocols (kNN now; linear, semi-supervised and plots follow the evaluation issue)."""
from tfssl.eval.knn import embed, knn_accuracy, weighted_knn

__all__ = ["embed", "knn_accuracy", "weighted_knn"]
