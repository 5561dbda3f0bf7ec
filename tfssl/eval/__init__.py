"""Evaluation protocols of frozen or fine-tuned backbones (METHODS.md, "Evaluation protocols").

knn (weighted k=200 and majority k=20), linear (precomputed or augmented features, validation split from train),
semi (fine-tuning on a stratified label fraction), monitors (collapse and quality metrics), plots (t-SNE,
retrieval grid, TensorBoard images and projector) and features (exported backbones, feature cache). The
``tfssl eval linear/semi/plot`` commands are being wired to these (issue #6).
"""
from tfssl.eval.knn import embed, knn_accuracy, knn_report, weighted_knn

__all__ = ["embed", "knn_accuracy", "knn_report", "weighted_knn"]
