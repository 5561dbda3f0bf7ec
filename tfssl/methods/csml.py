"""CsMl (Xu et al., "Seed the Views", TPAMI): MoCo v2 with positives from *other* images (METHODS.md, "CsMl").

Every anchor i comes with a neighbour j drawn from its top-k momentum-encoder neighbours (:mod:`tfssl.mining`,
re-mined every ``mine_every`` epochs from epoch 0; before the first mining j = i) and a CutMix ``m`` of the two
query views (:mod:`tfssl.cutmix`; λ′ = the anchor's kept pixel fraction). The student embeds q_i, q_j, q_m, the
teacher k_i, k_j, and (step 5, :func:`tfssl.losses.csml_terms`)

    L = [w0·ℓ(q_i,k_i) + w1·ℓ(q_i,k_j) + w0·ℓ(q_j,k_j) + w1·ℓ(q_j,k_i) + λ′·ℓ(q_m,k_i) + (1−λ′)·ℓ(q_m,k_j)] / 3,

ℓ = MoCo InfoNCE against the queue; (w0, w1) = (1, 0) while the epoch is below ``cross_warmup_epochs`` (10: epochs
0–9), then (0.5, 0.5); only k_i is enqueued. ``levels: [3, 4]`` adds the same loss on stage-3 features through
their own head (a slim copy of stage 4, then an MLP like the projector) with their own queue — a reconstruction
of the multi-level part, which the authors did not release. Shuffle-BN → synchronized BN (as MoCo v2 here).

A batch from :func:`tfssl.pipeline.pair_pipeline` is ``views = (q_i, k_i, q_j, k_j, q_m, λ′ per row)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List

import numpy as np
import keras
import tensorflow as tf

from tfssl import config, data, pipeline
from tfssl.backbones import build_stage_head, stage3_model
from tfssl.losses import csml_terms
from tfssl.methods.base import SSLMethod, normalize


@dataclass
class CsMlParams:
    method_name: ClassVar[str] = "csml"
    temperature: float = 0.2
    queue_size: int = 4096
    momentum: float = 0.99
    momentum_schedule: str = "constant"
    neighbours: int = 5                   # k of the top-k neighbour table
    mine_every: int = 5                   # epochs between minings (from epoch 0)
    cross_warmup_epochs: float = 10.0     # (w0, w1) = (1, 0) before, (0.5, 0.5) after
    levels: List[int] = field(default_factory=lambda: [4])   # [4] or [3, 4]
    stage3_blocks: int = 2
    mine_query_chunk: int = 1024
    mine_bank_chunk: int = 65536


@keras.saving.register_keras_serializable(package="tfssl")
class CsMl(SSLMethod):
    """CsMl: cross-sample positives (mined neighbours + CutMix) on MoCo v2, at stage 4 and optionally stage 3."""

    method_name = "csml"
    Params = CsMlParams
    uses_teacher = True
    view_recipes = ("strong", "strong")
    metric_names = ("level4_loss", "level3_loss", "cross_weight", "mix_lambda")

    def __init__(self, params, model_cfg, **kw):
        super().__init__(params, model_cfg, **kw)
        if 4 not in params.levels or not set(params.levels) <= {3, 4}:
            raise config.ConfigError(f"method.levels={params.levels}: use [4] or [3, 4]")
        dim = model_cfg.projector_dim
        self.queue, self.queue_ptr = self.add_queue("queue", params.queue_size, dim)
        self.cross_start = int(round(params.cross_warmup_epochs * self.steps_per_epoch))
        self.multi_level = 3 in params.levels
        self.student_levels = stage3_model(self.backbone)
        self.teacher_levels = stage3_model(self.teacher_backbone)
        if self.multi_level:
            head = dict(name=model_cfg.backbone, width=model_cfg.width, blocks=params.stage3_blocks,
                        sync_bn=model_cfg.sync_bn)
            self.stage3_head = build_stage_head(model_name="stage3_head", **head)
            self.stage3_projector = self.make_projector("stage3_projector")
            self.teacher_stage3_head = build_stage_head(model_name="teacher_stage3_head", **head)
            self.teacher_stage3_projector = self.make_projector("teacher_stage3_projector")
            for t, s in ((self.teacher_stage3_head, self.stage3_head),
                         (self.teacher_stage3_projector, self.stage3_projector)):
                t.set_weights(s.get_weights())
                self.teacher_pairs += list(zip(t.trainable_weights, s.trainable_weights))
            self.queue3, self.queue3_ptr = self.add_queue("queue3", params.queue_size, dim)

    @property
    def student_variables(self):
        extra = (self.stage3_head.trainable_variables + self.stage3_projector.trainable_variables
                 if self.multi_level else [])
        return super().student_variables + extra

    def _embed(self, images, teacher):
        """{4: z4[, 3: z3]} L2-normalised, plus pooled features; BN in train mode for student and teacher."""
        levels = self.teacher_levels if teacher else self.student_levels
        projector = self.teacher_projector if teacher else self.projector
        features, stage3 = levels(images, training=True)
        z = {4: normalize(projector(features, training=True))}
        if self.multi_level:
            head = self.teacher_stage3_head if teacher else self.stage3_head
            proj = self.teacher_stage3_projector if teacher else self.stage3_projector
            z[3] = normalize(proj(head(stage3, training=True), training=True))
        return features, ({k: tf.stop_gradient(v) for k, v in z.items()} if teacher else z)

    def teacher_outputs(self, views):
        return {"ki": self._embed(views[1], True)[1], "kj": self._embed(views[3], True)[1]}

    def student_loss(self, views, teacher):
        lam = tf.cast(views[5], tf.float32)
        cross = tf.cast(self.optimizer.iterations >= self.cross_start, tf.float32)
        w0, w1 = 1.0 - 0.5 * cross, 0.5 * cross
        features, qi = self._embed(views[0], False)
        _, qj = self._embed(views[2], False)
        _, qm = self._embed(views[4], False)
        ki, kj = teacher["ki"], teacher["kj"]
        terms = {level: csml_terms(qi[level], qj[level], qm[level], ki[level], kj[level], queue,
                                   self.params.temperature, w0, w1, lam)
                 for level, queue in ((4, self.queue), (3, getattr(self, "queue3", None))) if level in qi}
        share = tf.add_n([tf.reduce_sum(t) for t in terms.values()]) / self.global_batch(lam)
        enqueue = [(self.queue, self.queue_ptr, ki[4])]
        if self.multi_level:
            enqueue.append((self.queue3, self.queue3_ptr, ki[3]))
        out = {"features": features, "z": qi[4], "enqueue": enqueue, "cross_weight": w1,    # metrics: local means
               "level4_loss": tf.reduce_mean(terms[4]), "mix_lambda": tf.reduce_mean(lam),
               "level3_loss": tf.reduce_mean(terms[3]) if 3 in terms else tf.constant(0.0)}
        return share, out

    # ----------------------------------------------------------------- pretraining job: pairs and mining
    def make_pipeline(self, source, views, cfg, steps, epoch, views_parallelism=None):
        """:func:`tfssl.pipeline.pair_pipeline` over a host neighbour table, initially every image its own neighbour."""
        from tfssl.cutmix import cutmix
        k = self.params.neighbours
        with tf.device("/cpu:0"):
            self.neighbour_table = tf.Variable(np.tile(np.arange(source.num_train, dtype=np.int32)[:, None], (1, k)),
                                               trainable=False, name="neighbour_table")
        return pipeline.pair_pipeline(source, self.neighbour_table, None if cfg.augment.on_device else views,
                                      cfg.train.batch_size, cutmix, seed=cfg.data.seed or 0, steps=steps, epoch=epoch,
                                      views_parallelism=views_parallelism)

    def device_views(self, data, step, seed, global_seed):
        """On-device pairs (``augment.on_device``): (q, k) views of the anchors and of their neighbours, then the
        CutMix of the two q-views with one box per *global* batch (``global_seed``), as :func:`pair_pipeline`."""
        from tfssl.cutmix import cutmix
        from tfssl.rng import fold_in as fold
        qi, ki = self.views(data["anchor"], step=step, seed=fold(seed, 1))[:2]
        qj, kj = self.views(data["neighbour"], step=step, seed=fold(seed, 2))[:2]
        qm, lam = cutmix(qi, qj, global_seed)
        return qi, ki, qj, kj, qm, tf.fill([tf.shape(qi)[0]], lam)

    def example_batch(self, size):
        image = tf.zeros([2, size, size, self._bb_args["channels"]], tf.uint8)
        return {"anchor": image, "neighbour": image}

    def job_callbacks(self, source, cfg, log=print):
        """The :class:`tfssl.mining.NeighbourMiner` (it mines at epoch starts, before the epoch's batches are read)."""
        from tfssl.mining import NeighbourMiner
        p, size = self.params, cfg.augment.size
        side = source.train.element_spec["image"].shape[0] or size   # originals: already the evaluation view
        images = data.eval_pipeline(source.train, 256)
        if side > size:                                  # the centre view: a size×size centre crop (ImageNet 224/256)
            images = images.map(lambda x, y: (x[:, (side - size) // 2:(side - size) // 2 + size,
                                                 (side - size) // 2:(side - size) // 2 + size], y))
        self.miner = NeighbourMiner(images, self.neighbour_table, p.mine_every,
                                    p.neighbours, labels=source.num_classes > 0, query_chunk=p.mine_query_chunk,
                                    bank_chunk=p.mine_bank_chunk, log=log)
        self.miner.set_model(self)
        return [self.miner]

    def job_state(self):
        """The neighbour table and the mining history (a resumed run mines again only at its ``mine_every`` epochs)."""
        return {"neighbour_table": self.neighbour_table}, lambda: {"mining": list(self.miner.history)}

    def load_job_state(self, records):
        self.miner.history[:] = records.get("mining", [])

    def job_summary(self):
        """``neighbour_label_agreement``: per mining, the fraction of table entries sharing the anchor's label
        (monitoring only; labels never reach training)."""
        miner = getattr(self, "miner", None)
        return {"neighbour_label_agreement": list(miner.history) if miner is not None else []}
