"""View recipes (METHODS.md, "Views and augmentation") as Keras preprocessing layers working on whole batches.

Every layer takes float images [B,H,W,C] in [0,1] and draws its random parameters per image from TensorFlow ops that
XLA compiles on CPU, GPU and TPU, so the same layer runs in the tf.data pipeline (``augment.on_device: false``) or
inside an XLA-compiled ``train_step`` (``augment.on_device: true``) with the same distribution. Torchvision's
parameters map as follows: RandomResizedCrop → :class:`RandomResizedCrop` (area/aspect sampling, then bilinear
resampling on crop_and_resize's grid written as two interpolation matmuls: ``tf.image.crop_and_resize`` has no XLA
kernel; an oversized box is clipped rather than re-drawn), ColorJitter → :class:`ColorJitter` (fixed order
brightness, contrast, saturation, hue instead of torchvision's random order — a documented deviation),
RandomGrayscale, GaussianBlur (σ uniform, kernel ≈10% of the size), RandomSolarize (threshold 0.5).

Keras core has most of these layers but no RandomResizedCrop, and its layers draw from a stateful seed generator;
tfssl's draw statelessly inside :func:`seeded` (seed = data seed and training step), which is what makes a resumed
run see exactly the views of an uninterrupted one. Each layer is registered for saving, has ``get_config`` and takes
a ``seed``; any Keras core or keras-cv layer can be appended to a recipe by name (``augment.extra``, :func:`extra_layer`).
"""
from __future__ import annotations

import contextlib
import importlib
import math

import keras
import tensorflow as tf

from tfssl import rng

_SEEDS = []   # stack of [seed tensor, draw counter] set by :func:`seeded`


@contextlib.contextmanager
def seeded(seed):
    """Make every random draw of the views inside this block stateless: draw ``n`` (in tracing order) uses the seed
    ``fold_in(seed, n)``. ``seed`` is an int [2] tensor, e.g. (data seed, training step): the same step gives the same
    views in any process, so a resumed run sees exactly the views of an uninterrupted one. ``None``: each layer's own
    seed generator (or TensorFlow's global RNG for a layer without ``seed``)."""
    if seed is None:
        yield
        return
    _SEEDS.append([tf.cast(seed, tf.int64), 0])
    try:
        yield
    finally:
        _SEEDS.pop()


def _gray(images):
    if images.shape[-1] == 1:
        return images
    w = tf.constant([0.299, 0.587, 0.114], images.dtype)
    return tf.reduce_sum(images * w, axis=-1, keepdims=True)


class ViewLayer(keras.layers.Layer):
    """Base of tfssl's view layers: float images [B,H,W,C] in [0,1] in and out, per-image random draws.

    A draw is stateless inside :func:`seeded`; outside it, it comes from the layer's ``keras.random.SeedGenerator``
    when ``seed`` is an int (reproducible stand-alone use, saved with the layer), else from TensorFlow's global RNG.
    """

    def __init__(self, seed=None, **kw):
        super().__init__(**kw)
        self.seed = seed
        self._generator = keras.random.SeedGenerator(seed) if seed is not None else None

    def uniform(self, shape, minval=0.0, maxval=1.0):
        if _SEEDS:               # identical in tf.data, in a tf.function and under XLA (tfssl.rng)
            state = _SEEDS[-1]
            seed = rng.fold_in(state[0], state[1])
            state[1] += 1
            return rng.uniform(seed, shape, minval, maxval)
        if self._generator is not None:
            return keras.random.uniform(shape, minval, maxval, seed=self._generator)
        return tf.random.uniform(shape, minval, maxval)

    def per_image(self, images, p):
        """Boolean [B,1,1,1] mask, true with probability p per image."""
        return self.uniform([tf.shape(images)[0], 1, 1, 1]) < p

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def _interpolation(start, extent, n, size):
    """[B, size, n] bilinear weights of ``tf.image.crop_and_resize``'s sampling grid along one axis: output pixel i
    of a box starting at fraction ``start`` [B] with length ``extent`` [B] samples input position
    (start + i·extent/(size−1))·(n−1), split between its two neighbouring pixels."""
    last = tf.cast(n - 1, tf.float32)
    if size > 1:
        step = extent * last / (size - 1)
        pos = start[:, None] * last + tf.range(size, dtype=tf.float32)[None, :] * step[:, None]
    else:
        pos = (start + 0.5 * extent)[:, None] * last
    grid = tf.range(n, dtype=tf.float32)
    return tf.nn.relu(1.0 - tf.abs(pos[:, :, None] - grid[None, None, :]))


def resize_boxes(images, y0, x0, h, w, size):
    """Bilinear resampling of the box (top ``y0``, left ``x0``, height ``h``, width ``w``; fractions of the image, [B]
    each) of every image to ``size``×``size``, on the grid of ``tf.image.crop_and_resize`` (same values to float32
    rounding). Written as two batched matmuls with interpolation matrices (rows, then columns), which XLA compiles on
    CPU, GPU and TPU (matmuls run on the MXU); ``crop_and_resize`` has no XLA kernel."""
    images = tf.cast(images, tf.float32)
    rows = _interpolation(y0, h, tf.shape(images)[1], size)             # [B, size, H]
    cols = _interpolation(x0, w, tf.shape(images)[2], size)             # [B, size, W]
    out = tf.einsum("bih,bhwc->biwc", rows, images)
    out = tf.einsum("bjw,biwc->bijc", cols, out)
    return tf.ensure_shape(out, [images.shape[0], size, size, images.shape[-1]])


@keras.saving.register_keras_serializable(package="tfssl")
class RandomResizedCrop(ViewLayer):
    """Crop a random box of area fraction ∈ ``scale`` and aspect ratio ∈ ``ratio`` (log-uniform), resize to ``size``."""

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), **kw):
        super().__init__(**kw)
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)

    def boxes(self, batch):
        """(y0, x0, h, w) [B] each: the drawn boxes as fractions of the image (clipped to fit)."""
        area = self.uniform([batch], self.scale[0], self.scale[1])
        log_r = self.uniform([batch], math.log(self.ratio[0]), math.log(self.ratio[1]))
        h = tf.minimum(tf.sqrt(area / tf.exp(log_r)), 1.0)
        w = tf.minimum(tf.sqrt(area * tf.exp(log_r)), 1.0)
        y0 = self.uniform([batch]) * (1.0 - h)
        x0 = self.uniform([batch]) * (1.0 - w)
        return y0, x0, h, w

    def call(self, images):
        return resize_boxes(images, *self.boxes(tf.shape(images)[0]), self.size)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "size": self.size, "scale": list(self.scale), "ratio": list(self.ratio)}


@keras.saving.register_keras_serializable(package="tfssl")
class RandomFlip(ViewLayer):
    """Horizontal flip with probability 0.5 per image."""

    def call(self, images):
        return tf.where(self.per_image(images, 0.5), tf.reverse(images, axis=[2]), images)


@keras.saving.register_keras_serializable(package="tfssl")
class ColorJitter(ViewLayer):
    """Brightness, contrast, saturation (factors U(1−s, 1+s)) and hue (shift U(−h, h) turns), applied with prob p."""

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, **kw):
        super().__init__(**kw)
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def _factor(self, b, s):
        return self.uniform([b, 1, 1, 1], 1.0 - s, 1.0 + s)

    def call(self, images):
        b = tf.shape(images)[0]
        x = images
        if self.brightness:
            x = tf.clip_by_value(x * self._factor(b, self.brightness), 0.0, 1.0)
        if self.contrast:
            mean = tf.reduce_mean(_gray(x), axis=[1, 2, 3], keepdims=True)
            x = tf.clip_by_value((x - mean) * self._factor(b, self.contrast) + mean, 0.0, 1.0)
        if self.saturation and x.shape[-1] == 3:
            g = _gray(x)
            x = tf.clip_by_value((x - g) * self._factor(b, self.saturation) + g, 0.0, 1.0)
        if self.hue and x.shape[-1] == 3:
            hsv = tf.image.rgb_to_hsv(x)
            shift = self.uniform([b, 1, 1], -self.hue, self.hue)
            hsv = tf.stack([tf.math.floormod(hsv[..., 0] + shift, 1.0), hsv[..., 1], hsv[..., 2]], axis=-1)
            x = tf.image.hsv_to_rgb(hsv)
        return tf.where(self.per_image(images, self.p), x, images)

    def get_config(self):
        return {**super().get_config(), "brightness": self.brightness, "contrast": self.contrast,
                "saturation": self.saturation, "hue": self.hue, "p": self.p}


@keras.saving.register_keras_serializable(package="tfssl")
class RandomGrayscale(ViewLayer):
    """Replace an image by its luma (kept at C channels) with probability p."""

    def __init__(self, p=0.2, **kw):
        super().__init__(**kw)
        self.p = p

    def call(self, images):
        gray = tf.broadcast_to(_gray(images), tf.shape(images))
        return tf.where(self.per_image(images, self.p), gray, images)

    def get_config(self):
        return {**super().get_config(), "p": self.p}


@keras.saving.register_keras_serializable(package="tfssl")
class GaussianBlur(ViewLayer):
    """Separable Gaussian blur, σ ~ U(sigma), kernel ≈ ``kernel_fraction`` of the size (odd), with probability p."""

    def __init__(self, size, sigma=(0.1, 2.0), p=0.5, kernel_fraction=0.1, **kw):
        super().__init__(**kw)
        self.size, self.kernel_fraction = int(size), kernel_fraction
        self.k = max(3, int(size * kernel_fraction) // 2 * 2 + 1)
        self.sigma, self.p = tuple(sigma), p

    def call(self, images):
        b, c = tf.shape(images)[0], images.shape[-1]
        sigma = self.uniform([b, 1], self.sigma[0], self.sigma[1])
        r = tf.cast(tf.range(self.k) - self.k // 2, tf.float32)[None, :]
        kernel = tf.exp(-0.5 * tf.square(r / sigma))
        kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)         # [B,k]
        kernel = tf.reshape(tf.repeat(kernel, c, axis=0), [-1, self.k])         # [B*C,k]
        x = tf.transpose(images, [1, 2, 0, 3])                                  # [H,W,B,C]
        shape = tf.shape(x)
        x = tf.reshape(x, [1, shape[0], shape[1], -1])                          # [1,H,W,B*C]
        r = self.k // 2                                                         # reflect, as torchvision does
        x = tf.pad(x, [[0, 0], [r, r], [r, r], [0, 0]], "SYMMETRIC")
        kx = tf.transpose(kernel)[None, :, :, None]                             # [1,k,B*C,1]
        ky = tf.transpose(kernel)[:, None, :, None]                             # [k,1,B*C,1]
        x = tf.nn.depthwise_conv2d(x, kx, [1, 1, 1, 1], "VALID")
        x = tf.nn.depthwise_conv2d(x, ky, [1, 1, 1, 1], "VALID")
        x = tf.transpose(tf.reshape(x, shape), [2, 0, 1, 3])
        return tf.where(self.per_image(images, self.p), x, images)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "sigma": list(self.sigma), "p": self.p,
                "kernel_fraction": self.kernel_fraction}


@keras.saving.register_keras_serializable(package="tfssl")
class RandomSolarize(ViewLayer):
    """Invert pixels ≥ 0.5 with probability p."""

    def __init__(self, p=0.2, **kw):
        super().__init__(**kw)
        self.p = p

    def call(self, images):
        return tf.where(self.per_image(images, self.p), tf.where(images < 0.5, images, 1.0 - images), images)

    def get_config(self):
        return {**super().get_config(), "p": self.p}


# Colour strength per preset: Fashion-MNIST is gray, so only brightness/contrast remain; blur only at ImageNet size.
PRESETS = {
    "fashion_mnist": dict(jitter=(0.4, 0.4, 0.0, 0.0), strong_jitter=(0.4, 0.4, 0.0, 0.0), blur=False),
    "cifar": dict(jitter=(0.4, 0.4, 0.4, 0.1), strong_jitter=(0.4, 0.4, 0.4, 0.1), blur=False),
    "stl10": dict(jitter=(0.4, 0.4, 0.4, 0.1), strong_jitter=(0.8, 0.8, 0.8, 0.2), blur=True),
    "imagenet": dict(jitter=(0.4, 0.4, 0.4, 0.1), strong_jitter=(0.8, 0.8, 0.8, 0.2), blur=True),
}
RECIPES = ("strong", "simclr", "weak", "byol1", "byol2")


def extra_layer(spec):
    """A Keras layer from a recipe entry ``{layer: NAME, args: {...}}`` (``augment.extra``): NAME is a Keras core
    layer (``RandomColorJitter`` or ``keras.layers.RandomColorJitter``), a keras-cv layer
    (``keras_cv.layers.RandAugment``) or any importable ``module.Class``. Raises ValueError naming the problem."""
    if not isinstance(spec, dict) or "layer" not in spec or set(spec) - {"layer", "args", "recipes"}:
        raise ValueError(f"augment.extra entry {spec!r}: expected {{layer: NAME, args: {{...}}, recipes: [...]}} "
                         f"(args and recipes optional)")
    name, args = str(spec["layer"]), dict(spec.get("args") or {})
    if "." not in name:
        name = "keras.layers." + name
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"augment.extra layer {spec['layer']!r} not found ({type(e).__name__}: {e}); give a Keras "
                         f"core layer name such as RandomColorJitter, or module.Class such as "
                         f"keras_cv.layers.RandAugment") from None
    try:
        layer = cls(**args)
    except Exception as e:
        raise ValueError(f"augment.extra layer {spec['layer']} cannot be built with args {args}: "
                         f"{type(e).__name__}: {e}") from None
    if not callable(layer):
        raise ValueError(f"augment.extra layer {spec['layer']} is not a layer")
    return layer


@keras.saving.register_keras_serializable(package="tfssl")
class Extra(keras.layers.Layer):
    """A foreign augmentation layer (Keras core, keras-cv) inside a view: called in training mode on float images in
    [0, 1], output cast back to float32 and clipped to [0, 1]. It draws from its own seed generator, not from
    :func:`seeded`, so exact resume does not cover its draws (a documented limitation)."""

    def __init__(self, spec, **kw):
        super().__init__(**kw)
        self.spec = dict(spec)
        self.inner = extra_layer(self.spec)

    def call(self, images):
        out = self.inner(images, training=True)
        return tf.clip_by_value(tf.cast(out, tf.float32), 0.0, 1.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "spec": self.spec}


def view(recipe, preset="cifar", size=32, scale=None, extra=()):
    """One view recipe as a ``keras.Sequential``: strong (MoCo v2), simclr, weak (ReSSL teacher), byol1, byol2;
    ``extra``: ``augment.extra`` entries appended (those whose ``recipes`` list includes this recipe, or all)."""
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
        if p["blur"]:
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
                 warmup_steps=0, extra=(), crop_scale=None, **kw):
        super().__init__(**kw)
        self._args = dict(recipes=list(recipes), preset=preset, size=size, small_crops=small_crops,
                          small_size=small_size, small_scale=list(small_scale),
                          small_sizes=list(small_sizes) if small_sizes else None,
                          small_scales=[list(s) for s in small_scales] if small_scales else None,
                          warmup_recipes=list(warmup_recipes) if warmup_recipes else None,
                          warmup_steps=int(warmup_steps), extra=[dict(e) for e in extra or ()],
                          crop_scale=list(crop_scale) if crop_scale else None)
        extra, scale = self._args["extra"], tuple(crop_scale) if crop_scale else None
        self.large = [view(r, preset, size, scale=scale, extra=extra) for r in recipes]
        self.warmup_steps = int(warmup_steps) if warmup_recipes else 0
        if self.warmup_steps and len(warmup_recipes) != len(recipes):
            raise ValueError(f"warmup_recipes {tuple(warmup_recipes)} must have as many views as {tuple(recipes)}")
        self.warmup = [view(r, preset, size, scale=scale, extra=extra) for r in warmup_recipes] \
            if self.warmup_steps else []
        sizes = list(small_sizes) if small_sizes else [small_size] * small_crops
        scales = list(small_scales) if small_scales else [tuple(small_scale)] * len(sizes)
        self.small = [view(recipes[0], preset, s, scale=tuple(sc), extra=extra) for s, sc in zip(sizes, scales)]

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

    def get_config(self):
        return {**super().get_config(), **self._args}


def from_config(augment_cfg, recipes, small_sizes=None, small_scales=None, warmup_recipes=None, warmup_steps=0):
    """Build :class:`Views` for a method's ``recipes`` from an :class:`tfssl.config.AugmentConfig`."""
    return Views(recipes, augment_cfg.preset, augment_cfg.size, augment_cfg.small_crops, augment_cfg.small_size,
                 augment_cfg.small_scale, small_sizes=small_sizes, small_scales=small_scales,
                 warmup_recipes=warmup_recipes, warmup_steps=warmup_steps,
                 extra=getattr(augment_cfg, "extra", None) or (), crop_scale=augment_cfg.crop_scale)
