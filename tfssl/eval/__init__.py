"""Evaluation protocols of frozen or fine-tuned backbones (METHODS.md, "Evaluation protocols").

knn (weighted k=200 and majority k=20), linear (precomputed or augmented features, validation split from train),
semi (fine-tuning on a stratified label fraction, pseudo-label round), monitors (collapse and quality metrics),
plots (t-SNE, retrieval grid, TensorBoard images and projector), features (exported backbones, feature cache) and
protocols (what ``tfssl eval`` runs on a run directory, recorded in its summary.json).
"""
from tfssl.eval.knn import embed, knn_accuracy, knn_report, weighted_knn

__all__ = ["embed", "knn_accuracy", "knn_report", "weighted_knn"]
