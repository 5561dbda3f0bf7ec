"""WCL (Zheng et al., ICCV 2021, "Weakly Supervised Contrastive Learning"): SimCLR plus a graph head whose 1-NN
graph over the global batch gives weak labels for a swapped supervised contrastive loss (METHODS.md, WCL).

Backbone F, instance head g and graph head φ, each Linear-BN-ReLU-Linear-BN-ReLU-Linear (synchronized BN under
``model.sync_bn``). Per view v: z_v = ‖g(F(x_v))‖, h_v = ‖φ(F(x_v))‖. Loss = NT-Xent(z1, z2; τ) (eq. 1) +
(L_sup(h1, sg(H1), mask(H2)) + L_sup(h2, sg(H2), mask(H1))) / 2 (eq. 5), where H_v gathers h_v over all replicas
and mask(H) are the components of its 1-NN graph (:func:`tfssl.losses.weak_labels`), identical on every replica;
each replica computes the terms of its own rows. Views: MoCo-v2 strength for ``view_warmup_epochs``, then SimCLR.

**KNN multi-crop** (paper §3.4; *not in the released code — tfssl's reconstruction*): ``knn_crops`` small crops
per image pass through F and both heads. A crop's score is its graph embedding's cosine to the mean of its own
image's two large-view graph embeddings (no gradient); the ``knn_crops_keep`` nearest crops of each image are kept,
the others (likely missing the object) add nothing. A kept crop joins its image's weak-label component: its
instance term has the image's two large views as positives among all 2B large views; its graph term contrasts it
with sg(H1) (positives: the image's component in view 2's graph) and sg(H2) (view 1's graph), averaged. The crop
loss is the mean over the K·B kept crops, added with weight ``knn_crop_weight``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import keras
import tensorflow as tf

from tfssl import distribute
from tfssl.backbones import build_mlp
from tfssl.losses import component_stats, knn_crop_terms, nt_xent_terms, wcl_graph_terms, weak_labels
from tfssl.methods.base import SSLMethod, normalize


@dataclass
class WCLParams:
    method_name: ClassVar[str] = "wcl"
    temperature: float = 0.1              # NT-Xent on the instance head
    graph_temperature: float = 0.1        # supervised contrastive loss on the graph head
    graph_hidden: Optional[int] = None    # graph head sizes; None = model.projector_hidden / projector_dim
    graph_dim: Optional[int] = None
    view_warmup_epochs: float = 10.0      # MoCo-v2-strength views first, SimCLR strength afterwards
    knn_crops: int = 0                    # KNN multi-crop: small crops per image (paper: 6)
    knn_crop_size: int = 96
    knn_crop_scale: List[float] = field(default_factory=lambda: [0.05, 0.14])
    knn_crops_keep: int = 2               # K: crops kept per image, those nearest to its large views
    knn_crop_weight: float = 1.0


@keras.saving.register_keras_serializable(package="tfssl")
class WCL(SSLMethod):
    """WCL: instance head (NT-Xent) + graph head (weak-label supervised contrastive), optional KNN multi-crop."""

    method_name = "wcl"
    Params = WCLParams
    view_recipes = ("simclr", "simclr")
    warmup_view_recipes = ("strong", "strong")
    metric_names = ("instance_loss", "graph_loss", "weak_components", "weak_component_size")
    label_metric_names = ("weak_precision",)

    def __init__(self, params, model_cfg, **kw):
        if params.knn_crops and not 0 < params.knn_crops_keep <= params.knn_crops:
            raise ValueError(f"method.knn_crops_keep={params.knn_crops_keep} must be in 1…knn_crops="
                             f"{params.knn_crops}")
        super().__init__(params, model_cfg, **kw)
        self.graph_head = self.make_projector("graph_head", params.graph_hidden, params.graph_dim)

    @classmethod
    def small_crops(cls, params, size):
        scale = tuple(params.knn_crop_scale)
        return [params.knn_crop_size] * params.knn_crops, [scale] * params.knn_crops

    def make_projector(self, name, hidden=None, dim=None):
        """WCL heads: Linear(d,H)-BN-ReLU-Linear(H,H)-BN-ReLU-Linear(H,D)."""
        c = self.model_cfg
        hidden, dim = hidden or c.projector_hidden, dim or c.projector_dim
        head = build_mlp([hidden, hidden, dim], batch_norm=True, sync_bn=c.sync_bn, name=name)
        head.build((None, self.feature_dim))
        return head

    @property
    def student_variables(self):
        return super().student_variables + self.graph_head.trainable_variables

    def heads(self, images):
        """(features, z = ‖g(F(x))‖, h = ‖φ(F(x))‖) in training mode."""
        features = self.backbone(images, training=True)
        return (features, normalize(self.projector(features, training=True)),
                normalize(self.graph_head(features, training=True)))

    def student_loss(self, views, teacher):
        p = self.params
        f1, z1, h1 = self.heads(views[0])
        _, z2, h2 = self.heads(views[1])
        n = self.global_batch(z1)
        idx = tf.range(tf.shape(z1)[0], dtype=tf.int32) + distribute.replica_offset(tf.shape(z1)[0])
        z_all = (distribute.gather(z1), distribute.gather(z2))
        h_all = (distribute.gather(tf.stop_gradient(h1)), distribute.gather(tf.stop_gradient(h2)))
        labels = (weak_labels(h_all[0]), weak_labels(h_all[1]))
        instance = tf.reduce_sum(nt_xent_terms(z1, z2, *z_all, idx[0], p.temperature)) / (2.0 * n)
        graph = tf.reduce_sum(wcl_graph_terms(h1, h2, *h_all, *labels, idx[0], p.graph_temperature)) / (2.0 * n)
        loss = instance + graph
        if len(views) > 2:
            loss += p.knn_crop_weight * self.crop_loss(views[2:], (h1, h2), z_all, h_all, labels, idx, n)
        stats = [component_stats(l) for l in labels]
        return loss, {"features": f1, "z": z1, "weak_labels": labels,
                      "instance_loss": distribute.global_sum(tf.stop_gradient(instance)),
                      "graph_loss": distribute.global_sum(tf.stop_gradient(graph)),
                      "weak_components": (stats[0][0] + stats[1][0]) / 2.0,
                      "weak_component_size": (stats[0][1] + stats[1][1]) / 2.0}

    def crop_loss(self, crops, h, z_all, h_all, labels, idx, n):
        """This replica's share of the KNN multi-crop loss: mean over the K·B kept crops (:func:`knn_crop_terms`)."""
        p = self.params
        outs = [self.heads(c) for c in crops]
        terms, kept = knn_crop_terms(tf.stack([o[1] for o in outs], 1), tf.stack([o[2] for o in outs], 1),
                                     (h[0] + h[1]) / 2.0, idx, tf.concat(z_all, 0), *h_all, *labels,
                                     p.knn_crops_keep, p.temperature, p.graph_temperature)
        return tf.reduce_sum(terms * kept) / (p.knn_crops_keep * n)

    def label_metrics(self, out, labels):
        """Weak-label precision: fraction of same-component pairs of the global batch sharing the true class."""
        classes = distribute.gather(tf.cast(labels, tf.int32))
        precision = [component_stats(l, classes)[2] for l in out["weak_labels"]]
        return {"weak_precision": (precision[0] + precision[1]) / 2.0}
