"""What makes a method a Keras model like any other: saving and loading, ``evaluate`` and ``export``.

:class:`KerasNative` (a mixin of :class:`tfssl.methods.base.SSLMethod`) gives every method

* ``get_config`` / ``from_config``: the recipe sections that build it (``method``, ``model``, ``augment`` and the
  on-device views, if any)
  and its constructor arguments. With each method registered as ``tfssl>ReSSL`` etc., ``model.save("run.keras")``,
  ``keras.saving.load_model("run.keras")`` (safe mode, no ``custom_objects`` after ``import tfssl``) and
  ``keras.callbacks.ModelCheckpoint("ckpt.keras")`` round-trip the whole state a ``.keras`` file holds: student,
  teacher, queues and pointers, momentum, probe, BatchNorm statistics, metrics and both optimizers' slots and step
  counters (``get_compile_config`` / ``compile_from_config`` rebuild the two optimizers; Keras would otherwise skip a
  custom ``compile``). Host state of the pretraining job (CsMl's neighbour table) is not part of the model.
* ``test_step``: ``model.evaluate(labelled)`` reports the online probe's loss and accuracy on the frozen backbone.
* ``export``: the *backbone* exported as ``tfssl export`` does it (:func:`tfssl.export.export_backbone`).
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfssl import distribute


def _inner(optimizer):
    """The optimizer a recipe builds, without the wrapper ``train.on_nan: skip`` adds (compile adds it again)."""
    from tfssl.optim import SkipNonFinite
    return optimizer.inner_optimizer if isinstance(optimizer, SkipNonFinite) else optimizer


class KerasNative:
    """Mixin: serialisation, ``evaluate`` and ``export`` of a method model (see the module docstring)."""

    def get_config(self):
        views = keras.saving.serialize_keras_object(self.views) if self.views is not None else None
        return {"name": self.name, "method": {"name": self.method_name, **dataclasses.asdict(self.params)},
                "model": dataclasses.asdict(self.model_cfg), "num_classes": self.num_classes,
                "channels": self._bb_args["channels"], "mean": list(self._bb_args["mean"]),
                "std": list(self._bb_args["std"]), "views": views, "total_steps": self.total_steps,
                "seed": self.seed, "steps_per_epoch": self.steps_per_epoch, "on_nan": self.on_nan,
                "kernels": self.kernel_setting, "augment": self.augment}

    @classmethod
    def from_config(cls, config):
        from tfssl import config as recipe
        c = dict(config)
        source = f"saved {cls.__name__} model"
        params = recipe.build_section("method", c.pop("method"), source)
        model_cfg = recipe.build_section("model", c.pop("model"), source)
        views = c.pop("views", None)
        views = keras.saving.deserialize_keras_object(views) if views else None
        return cls(params, model_cfg, views=views, **c)

    def get_compile_config(self):
        if getattr(self, "optimizer", None) is None:
            return None
        return {"optimizer": keras.saving.serialize_keras_object(_inner(self.optimizer)),
                "probe_optimizer": keras.saving.serialize_keras_object(_inner(self.probe_optimizer)),
                "jit_compile": self.jit_compile}

    def compile_from_config(self, config):
        if not config:
            return
        optimizer = keras.saving.deserialize_keras_object(config["optimizer"])
        probe = keras.saving.deserialize_keras_object(config["probe_optimizer"])
        self.compile(optimizer, probe_optimizer=probe, jit_compile=config.get("jit_compile", "auto"))

    # ------------------------------------------------------------------------------------------------ evaluate
    def _labelled(self, data):
        """(float images in [0, 1], int32 labels) of an evaluation batch; one clear error otherwise."""
        if isinstance(data, dict):
            images, labels = data.get("image"), data.get("label")
        elif isinstance(data, (tuple, list)) and len(data) >= 2:
            images, labels = data[0], data[1]
        else:
            images, labels = data, None
        if images is None or labels is None:
            what = ("these are training batches of views ({'views': ..., 'label': ...}); pass the evaluation "
                    "pipeline's images, e.g. tfssl.data.eval_pipeline(source.test, 256)"
                    if isinstance(data, dict) and "views" in data else "these batches have no labels")
            raise ValueError("model.evaluate needs labelled images: batches of (images, labels) or {'image': "
                             f"images, 'label': labels}}, images uint8 [B, H, W, C] or float in [0, 1]; {what}")
        if self.probe is None:
            raise ValueError("model.evaluate reports the online probe, but this model has none (built with "
                             "num_classes=0); build it with the dataset's class count")
        images = tf.convert_to_tensor(images)
        images = tf.cast(images, tf.float32) / 255.0 if images.dtype == tf.uint8 else tf.cast(images, tf.float32)
        return images, tf.cast(labels, tf.int32)

    def test_step(self, data):
        """``model.evaluate``: the online probe (on the backbone in inference mode) on labelled images: its
        cross-entropy ``probe_loss`` and top-1 ``probe_acc``, over the global batch."""
        images, labels = self._labelled(data)
        logits = tf.cast(self.probe(self.backbone(images, training=False)), tf.float32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), labels), tf.float32)
        count = distribute.global_sum(tf.cast(tf.size(labels), tf.float32))
        weight = count / tf.cast(distribute.num_replicas(), tf.float32)
        self.trackers["probe_loss"].update_state(distribute.global_sum(tf.reduce_sum(ce)) / count,
                                                 sample_weight=weight)
        self.trackers["probe_acc"].update_state(distribute.global_sum(tf.reduce_sum(correct)) / count,
                                                sample_weight=weight)
        return {"probe_loss": self.trackers["probe_loss"].result(), "probe_acc": self.trackers["probe_acc"].result()}

    # -------------------------------------------------------------------------------------------------- export
    def export(self, filepath, format="tfssl", verbose=True, **kwargs):
        """Export the pretrained *backbone* (no heads, no teacher) as ``tfssl export`` does: ``saved_model/`` (the
        ``serve`` endpoint Keras's TFSMLayer calls, ``serving_default`` on uint8), ``backbone.onnx``,
        ``backbone.keras`` (stock layers) and a model card, each checked for parity. ``format``: ``tfssl`` (all
        three), ``tf_saved_model``, ``onnx`` or ``keras``; other keyword arguments go to
        :func:`tfssl.export.export_backbone` (``input_size``, ``overwrite``, ``sample_images``, …)."""
        from tfssl.export import FORMATS, export_backbone
        chosen = {"tfssl": FORMATS, "tf_saved_model": ("savedmodel",), "onnx": ("onnx",), "keras": ("keras",)}
        if format not in chosen:
            raise ValueError(f"export format={format!r}: choose tfssl (all), tf_saved_model, onnx or keras")
        kwargs.setdefault("channels", self._bb_args["channels"])
        kwargs.setdefault("formats", chosen[format])
        card = export_backbone(self.backbone, filepath, **kwargs)
        if verbose:
            print(f"exported the {self.method_name} backbone to {filepath} ({', '.join(card['formats'])})")
        return card
