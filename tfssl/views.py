"""View recipes (METHODS.md, "Views and augmentation") as Keras preprocessing layers working on whole batches.

Every layer takes float images [B,H,W,C] in [0,1] and draws its random parameters per image from TensorFlow ops that
XLA compiles on CPU, GPU and TPU, so the same layer runs in the tf.data pipeline (``augment.on_device: false``) or
inside an XLA-compiled ``train_step`` (``augment.on_device: true``) with the same distribution. Torchvision's
parameters map as follows: RandomResizedCrop → :class:`RandomResizedCrop` (area/aspect sampling, then bilinear
resampling on crop_and_resize's grid written as two interpolation matmuls: ``tf.image.crop_and_resize`` has no XLA
kernel; an oversized box is clipped rather than re-drawn), ColorJitter → :class:`ColorJitter` (fixed order
brightness, contrast, saturation, hue instead of torchvision's random order — a documented deviation),
RandomGrayscale, GaussianBlur (σ uniform, kernel to 3σ), RandomSolarize (threshold 0.5).

Keras core has most of these layers but no RandomResizedCrop, and its layers draw from a stateful seed generator;
tfssl's draw statelessly inside :func:`seeded` (seed = data seed and training step), which is what makes a resumed
run see exactly the views of an uninterrupted one. Each layer is registered for saving, has ``get_config`` and takes
a ``seed``; any Keras core or keras-cv layer can be appended to a recipe by name (``augment.extra``, :func:`extra_layer`).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from tfssl import rng
from tfssl.view_ops import (  # noqa: F401  (the layers, re-exported)
    ColorJitter, Extra, GaussianBlur, RandomFlip, RandomGrayscale, RandomResizedCrop,
    RandomSolarize, ViewLayer, _after_crop, crop_original, extra_layer, resize_boxes, seeded)


# Colour strength per preset: Fashion-MNIST is gray, so only brightness/contrast remain; blur only at ImageNet size.
PRESETS = {
    "fashion_mnist": dict(jitter=(0.4, 0.4, 0.0, 0.0), strong_jitter=(0.4, 0.4, 0.0, 0.0), blur=False),
    "cifar": dict(jitter=(0.4, 0.4, 0.4, 0.1), strong_jitter=(0.4, 0.4, 0.4, 0.1), blur=False),
    "stl10": dict(jitter=(0.4, 0.4, 0.4, 0.1), strong_jitter=(0.8, 0.8, 0.8, 0.2), blur=True),
    "imagenet": dict(jitter=(0.4, 0.4, 0.4, 0.1), strong_jitter=(0.8, 0.8, 0.8, 0.2), blur=True),
}
RECIPES = ("strong", "simclr", "weak", "byol1", "byol2")


def view(recipe, preset="cifar", size=32, scale=None, extra=(), blur=None):
    """One view recipe as a ``keras.Sequential``: strong (MoCo v2), simclr, weak (ReSSL teacher), byol1, byol2;
    ``extra``: ``augment.extra`` entries appended (those whose ``recipes`` list includes this recipe, or all);
    ``blur``: Gaussian blur in the non-weak recipes (None: the preset's; ReSSL's CIFAR code blurs at 32 px)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown view recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    if preset not in PRESETS:
        raise ValueError(f"augment.preset={preset!r} is not one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    default_scale = (0.08, 1.0) if recipe in ("simclr", "byol1", "byol2") else (0.2, 1.0)
    ops = [RandomResizedCrop(size, scale or default_scale), RandomFlip()]
    if recipe != "weak":
        ops += [ColorJitter(*(p["strong_jitter"] if recipe != "strong" else p["jitter"]), p=0.8),
                RandomGrayscale(0.2)]
        blur_p = {"strong": 0.5, "simclr": 0.5, "byol1": 1.0, "byol2": 0.1}[recipe]
        if p["blur"] if blur is None else blur:
            ops.append(GaussianBlur(size, p=blur_p))
        if recipe == "byol2":
            ops.append(RandomSolarize(0.2))
    ops += [Extra(e) for e in extra or () if recipe in (e.get("recipes") or RECIPES)]
    return keras.Sequential(ops, name=f"view_{recipe}_{size}")


@keras.saving.register_keras_serializable(package="tfssl")
class Views(keras.layers.Layer):
    """Images (uint8 or float in [0,1]) → a tuple of views: the large ``recipes`` then ``small_crops`` small crops.

    Small crops (multi-crop, Caron et al. 2020) use the first recipe at ``small_size`` px with ``small_scale``.
    ``small_sizes``/``small_scales`` (lists) give each small crop its own size and scale range instead (ReSSL's
    192/160/128/96 crops with scale (0.2, 1)·size/224).

    View schedule: with ``warmup_recipes`` and ``warmup_steps > 0`` the large views use ``warmup_recipes`` while the
    training step (``call(images, step=…)``) is below ``warmup_steps`` and ``recipes`` afterwards (WCL: MoCo-v2
    strength for 10 epochs, then SimCLR strength). ``step=None`` means "after warm-up". Small crops always use
    ``recipes[0]``. ``extra``: ``augment.extra`` entries (Keras core / keras-cv layers) appended to the views;
    ``crop_scale``: the large views' crop area range instead of each recipe's default.
    """

    def __init__(self, recipes=("strong", "strong"), preset="cifar", size=32, small_crops=0, small_size=16,
                 small_scale=(0.05, 0.14), small_sizes=None, small_scales=None, warmup_recipes=None,
                 warmup_steps=0, extra=(), crop_scale=None, blur=None, **kw):
        super().__init__(**kw)
        self._args = dict(recipes=list(recipes), preset=preset, size=size, small_crops=small_crops,
                          small_size=small_size, small_scale=list(small_scale),
                          small_sizes=list(small_sizes) if small_sizes else None,
                          small_scales=[list(s) for s in small_scales] if small_scales else None,
                          warmup_recipes=list(warmup_recipes) if warmup_recipes else None,
                          warmup_steps=int(warmup_steps), extra=[dict(e) for e in extra or ()],
                          crop_scale=list(crop_scale) if crop_scale else None, blur=blur)
        extra, scale = self._args["extra"], tuple(crop_scale) if crop_scale else None
        self.large = [view(r, preset, size, scale=scale, extra=extra, blur=blur) for r in recipes]
        self.warmup_steps = int(warmup_steps) if warmup_recipes else 0
        if self.warmup_steps and len(warmup_recipes) != len(recipes):
            raise ValueError(f"warmup_recipes {tuple(warmup_recipes)} must have as many views as {tuple(recipes)}")
        self.warmup = [view(r, preset, size, scale=scale, extra=extra, blur=blur) for r in warmup_recipes] \
            if self.warmup_steps else []
        sizes = list(small_sizes) if small_sizes else [small_size] * small_crops
        scales = list(small_scales) if small_scales else [tuple(small_scale)] * len(sizes)
        self.small = [view(recipes[0], preset, s, scale=tuple(sc), extra=extra, blur=blur)
                      for s, sc in zip(sizes, scales)]

    def build(self, input_shape):
        for v in self.large + self.warmup + self.small:        # the view layers hold no weights of their own
            v.build(input_shape)
        self.built = True

    @property
    def count(self):
        """Number of views produced per image (large + small)."""
        return len(self.large) + len(self.small)

    @property
    def scheduled(self):
        """True when the large views depend on the training step (a warm-up recipe is set)."""
        return bool(self.warmup)

    def call(self, images, step=None, seed=None):
        """``seed``: an int [2] tensor making the draws stateless (:func:`seeded`); None uses the stateful RNG."""
        with seeded(seed):
            return self._views(images, step)

    def _views(self, images, step):
        if images.dtype == tf.uint8:
            images = tf.cast(images, tf.float32) / 255.0
        small = tuple(v(images) for v in self.small)
        if not self.scheduled or step is None:
            return tuple(v(images) for v in self.large) + small
        large = tf.cond(tf.cast(step, tf.int64) < self.warmup_steps, lambda: tuple(v(images) for v in self.warmup),
                        lambda: tuple(v(images) for v in self.large))
        return tuple(large) + small

    # ------------------------------------------------------------------ views of originals (image folders)
    def crop_stage(self, image, seed, step=None):
        """Crops of one original image (any size) for every view, each view's RandomResizedCrop on the original
        (:func:`crop_original`; under a view schedule, the warm-up recipe's crop scale before ``warmup_steps``):
        a tuple of float32 [size_v, size_v, C]. ``seed``: stateless [2], per image."""
        outs = []
        for k, view_seq in enumerate(self.large + self.small):
            crop = view_seq.layers[0]
            scale = tf.constant(crop.scale, tf.float32)
            if self.scheduled and k < len(self.large) and step is not None:
                warm = self.warmup[k].layers[0]
                scale = tf.where(tf.cast(step, tf.int64) < self.warmup_steps, tf.constant(warm.scale, tf.float32),
                                 scale)
            outs.append(crop_original(image, crop.size, scale, crop.ratio, rng.fold_in(seed, k)))
        return tuple(outs)

    def after_crop(self, crops, step=None, seed=None):
        """The rest of every view (flip, colour, blur, …: all but its crop) on batches of :meth:`crop_stage` crops;
        ``seed`` makes the draws stateless (:func:`seeded`), as in :meth:`call`."""
        n = len(self.large)
        with seeded(seed):
            small = tuple(_after_crop(v, c) for v, c in zip(self.small, crops[n:]))
            if not self.scheduled or step is None:
                return tuple(_after_crop(v, c) for v, c in zip(self.large, crops[:n])) + small
            large = tf.cond(tf.cast(step, tf.int64) < self.warmup_steps,
                            lambda: tuple(_after_crop(v, c) for v, c in zip(self.warmup, crops[:n])),
                            lambda: tuple(_after_crop(v, c) for v, c in zip(self.large, crops[:n])))
            return tuple(large) + small

    def get_config(self):
        return {**super().get_config(), **self._args}


def from_config(augment_cfg, recipes, small_sizes=None, small_scales=None, warmup_recipes=None, warmup_steps=0):
    """Build :class:`Views` for a method's ``recipes`` from an :class:`tfssl.config.AugmentConfig`."""
    return Views(recipes, augment_cfg.preset, augment_cfg.size, augment_cfg.small_crops, augment_cfg.small_size,
                 augment_cfg.small_scale, small_sizes=small_sizes, small_scales=small_scales,
                 warmup_recipes=warmup_recipes, warmup_steps=warmup_steps,
                 extra=getattr(augment_cfg, "extra", None) or (), crop_scale=augment_cfg.crop_scale,
                 blur=augment_cfg.blur)
