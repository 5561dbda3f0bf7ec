"""The view layers of tfssl's augmentation recipes (:mod:`tfssl.views` assembles them): Keras layers on batches of
float images [B, H, W, C] in [0, 1] drawing their random parameters per image, and the per-image crop of an original.

Draws are stateless inside :func:`seeded` (seed = data seed and training step: exact resume), from
:mod:`tfssl.rng` (bit-identical in tf.data, in a tf.function and under XLA); outside it a layer with ``seed`` uses its
own ``keras.random.SeedGenerator``. Every layer is registered for saving (``tfssl>RandomResizedCrop`` …), has
``get_config`` and only uses ops that XLA compiles on CPU, GPU and TPU. :class:`Extra` wraps a foreign (Keras core,
keras-cv) layer named in a recipe.
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


def in_xla():
    """Whether the ops being built will be XLA-compiled (inside a ``jit_compile=True`` function, on any device).
    TensorFlow marks that with an XLA control-flow context while it traces; if that internal check is missing the
    answer is True, which picks the ops XLA compiles (correct everywhere, a little slower in tf.data)."""
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:           # pragma: no cover - depends on TensorFlow's internals
        return True
    return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))


def resize_boxes(images, y0, x0, h, w, size):
    """Bilinear resampling of the box (top ``y0``, left ``x0``, height ``h``, width ``w``; fractions of the image, [B]
    each) of every image to ``size``×``size``, on the grid of ``tf.image.crop_and_resize`` (same values to float32
    rounding). Written as two batched matmuls with interpolation matrices (rows, then columns), which XLA compiles on
    CPU, GPU and TPU (matmuls run on the MXU); ``crop_and_resize`` has no XLA kernel. Outside XLA (the tf.data
    pipeline) ``crop_and_resize`` itself runs: the same values, and 1.3× fewer CPU cycles at 224 px
    (bench/NOTES.md §6)."""
    images = tf.cast(images, tf.float32)
    if not in_xla():
        boxes = tf.stack([y0, x0, y0 + h, x0 + w], axis=1)
        return tf.image.crop_and_resize(images, boxes, tf.range(tf.shape(images)[0]), [size, size])
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


ORIGINAL_TRIES = 10      # torchvision's RandomResizedCrop: up to 10 draws, then the centre fallback


def original_box(hw, scale, ratio, seed):
    """torchvision's ``RandomResizedCrop.get_params`` on an image of height and width ``hw`` (float [2]), drawn
    statelessly from ``seed`` [2]: up to 10 tries of a box of area fraction U(``scale``) of H·W and log-uniform aspect
    in ``ratio``, rounded to whole pixels; the first that fits is placed uniformly. If none fits, the whole image,
    cut to the nearest aspect in ``ratio``, centred. All tries are drawn at once (static shapes; XLA-friendly).
    Returns (y0, x0, h, w) in pixels, float."""
    u = rng.uniform(seed, [2 * ORIGINAL_TRIES + 2])
    scale = tf.cast(scale, tf.float32)
    area = hw[0] * hw[1] * (scale[0] + (scale[1] - scale[0]) * u[:ORIGINAL_TRIES])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[ORIGINAL_TRIES:2 * ORIGINAL_TRIES])
    w, h = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
    fits = (w > 0) & (w <= hw[1]) & (h > 0) & (h <= hw[0])
    first = tf.argmax(tf.cast(fits, tf.int32))            # index of the first try that fits (0 if none does)
    in_ratio = hw[1] / hw[0]                              # the fallback: centre crop of the whole image
    fall_w = tf.where(in_ratio < ratio[0], hw[1], tf.where(in_ratio > ratio[1], tf.round(hw[0] * ratio[1]), hw[1]))
    fall_h = tf.where(in_ratio < ratio[0], tf.round(hw[1] / ratio[0]), hw[0])
    any_fits = tf.reduce_any(fits)
    bw, bh = tf.where(any_fits, w[first], fall_w), tf.where(any_fits, h[first], fall_h)
    y0 = tf.where(any_fits, tf.minimum(tf.floor(u[-2] * (hw[0] - bh + 1.0)), hw[0] - bh), tf.floor((hw[0] - bh) / 2))
    x0 = tf.where(any_fits, tf.minimum(tf.floor(u[-1] * (hw[1] - bw + 1.0)), hw[1] - bw), tf.floor((hw[1] - bw) / 2))
    return y0, x0, bh, bw


def crop_original(image, size, scale, ratio, seed):
    """RandomResizedCrop of one image of any size and aspect, as torchvision's on the original
    (:func:`original_box`), resized (bilinear, antialiased) to ``size``×``size``. uint8 or float [H, W, C] in →
    float32 [size, size, C] in [0, 1]; ``seed``: a stateless seed [2] (the data seed and the image's position in the
    epoch, so a resumed run crops the same boxes)."""
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    box = [tf.cast(v, tf.int32) for v in original_box(hw, scale, ratio, seed)]
    crop = tf.image.crop_to_bounding_box(image, *box)
    crop = tf.cast(crop, tf.float32) / (255.0 if image.dtype == tf.uint8 else 1.0)
    out = tf.clip_by_value(tf.image.resize(crop, [size, size], antialias=True), 0.0, 1.0)
    out.set_shape([size, size, image.shape[-1]])
    return out


def _after_crop(view_seq, crops):
    """A view recipe without its RandomResizedCrop (applied to crops made from the originals)."""
    x = crops
    for layer in view_seq.layers[1:]:
        x = layer(x)
    return x


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
    """Separable Gaussian blur, σ ~ U(sigma), with probability p; the kernel reaches ``truncate``·σ_max on each side
    (3σ holds 99.7 % of the mass; PIL's GaussianBlur(radius=σ) in the papers' code does not truncate), at most the
    image's half-size. ``size``: the side of the images it blurs."""

    def __init__(self, size, sigma=(0.1, 2.0), p=0.5, truncate=3.0, **kw):
        super().__init__(**kw)
        self.size, self.truncate = int(size), float(truncate)
        self.sigma, self.p = tuple(sigma), p
        radius = min(max(1, math.ceil(self.truncate * self.sigma[1])), max(1, (self.size - 1) // 2))
        self.k = 2 * radius + 1

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
                "truncate": self.truncate}


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


SAFE_EXTRA_MODULES = ("keras", "keras_cv")


def _safe_mode():
    """Whether Keras is loading a file in safe mode right now (``load_model``'s default)."""
    try:
        from keras.src.saving.serialization_lib import in_safe_mode
        return bool(in_safe_mode())
    except ImportError:                       # an older Keras without the helper: be safe
        return True


def extra_layer(spec):
    """A Keras layer from a recipe entry ``{layer: NAME, args: {...}}`` (``augment.extra``): NAME is a Keras core
    layer (``RandomColorJitter`` or ``keras.layers.RandomColorJitter``), a keras-cv layer
    (``keras_cv.layers.RandAugment``) or another importable ``module.Class`` that is a Keras layer. Raises
    ValueError naming the problem.

    The class is checked *before* it is called: it must be a ``keras.layers.Layer`` subclass, and while Keras loads
    a file in safe mode (``keras.saving.load_model``'s default) it must also come from ``keras`` or ``keras_cv``, so
    a ``.keras`` file cannot make the loader call an arbitrary function through a view's stored spec."""
    if not isinstance(spec, dict) or "layer" not in spec or set(spec) - {"layer", "args", "recipes"}:
        raise ValueError(f"augment.extra entry {spec!r}: expected {{layer: NAME, args: {{...}}, recipes: [...]}} "
                         f"(args and recipes optional)")
    name, args = str(spec["layer"]), dict(spec.get("args") or {})
    if "." not in name:
        name = "keras.layers." + name
    module, _, attr = name.rpartition(".")
    if _safe_mode() and module.split(".")[0] not in SAFE_EXTRA_MODULES:
        raise ValueError(f"augment.extra layer {spec['layer']!r} comes from {module!r}: while loading in safe mode "
                         f"only keras and keras_cv layers are rebuilt; load the file with "
                         f"keras.saving.load_model(..., safe_mode=False) if you trust it")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"augment.extra layer {spec['layer']!r} not found ({type(e).__name__}: {e}); give a Keras "
                         f"core layer name such as RandomColorJitter, or module.Class such as "
                         f"keras_cv.layers.RandAugment") from None
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        raise ValueError(f"augment.extra layer {spec['layer']!r} is not a Keras layer class (a keras.layers.Layer "
                         f"subclass such as keras.layers.RandomColorJitter or keras_cv.layers.RandAugment)")
    try:
        layer = cls(**args)
    except Exception as e:
        raise ValueError(f"augment.extra layer {spec['layer']} cannot be built with args {args}: "
                         f"{type(e).__name__}: {e}") from None
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

    def build(self, input_shape):
        if not self.inner.built:
            self.inner.build(input_shape)

    def call(self, images):
        out = self.inner(images, training=True)
        return tf.clip_by_value(tf.cast(out, tf.float32), 0.0, 1.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "spec": self.spec}
