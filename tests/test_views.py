"""tfssl.views: every recipe under every preset (shape, dtype, range, randomness), the weak view's missing colour
ops, Gaussian blur, RandomResizedCrop geometry, multi-crop, and the same distribution on-device and in tf.data."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from tfssl import data, methods
from tfssl import views as V
from tfssl.config import AugmentConfig, DataConfig

EPS = 1e-5


def _random_images(b=16, size=40, seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(0, 1, (b, size, size, 3)), tf.float32)


def _constant(color, b=32, size=32):
    return tf.constant(np.broadcast_to(np.asarray(color, np.float32), (b, size, size, 3)).copy())


@pytest.fixture(scope="module")
def fmnist_image():
    """The first Fashion-MNIST training image as the library serves it: uint8 [32,32,3]."""
    src = data.load_source(DataConfig(limit=1, image_size=32, channels=3))
    return next(iter(src.train))["image"]


# ---------------------------------------------------------------------------------------------------- every recipe

@pytest.mark.parametrize("preset", list(V.PRESETS))
@pytest.mark.parametrize("recipe", V.RECIPES)
def test_recipe_shape_dtype_range(recipe, preset):
    keras.utils.set_random_seed(1)
    images = _random_images(b=16, size=40)
    out = V.view(recipe, preset, size=24)(images)
    assert out.shape == (16, 24, 24, 3) and out.dtype == tf.float32
    out = out.numpy()
    assert np.all(np.isfinite(out))
    assert out.min() >= -EPS and out.max() <= 1 + EPS
    # a view of a high-contrast image is not flattened to a constant
    assert out.std() > 0.05


@pytest.mark.parametrize("preset", list(V.PRESETS))
@pytest.mark.parametrize("recipe", V.RECIPES)
def test_two_views_of_same_image_differ(recipe, preset, fmnist_image):
    keras.utils.set_random_seed(2)
    batch = tf.repeat(fmnist_image[None], 8, axis=0)
    v1, v2 = V.Views((recipe, recipe), preset, 32)(batch)
    v1, v2 = v1.numpy(), v2.numpy()
    assert v1.shape == v2.shape == (8, 32, 32, 3)
    assert np.abs(v1 - v2).max() > 0.1
    # every image of the batch draws its own parameters
    assert all(np.abs(v1[0] - v1[i]).max() > 0.05 for i in range(1, 8))


def test_unknown_recipe_and_preset():
    with pytest.raises(ValueError, match="strong"):
        V.view("strongest")
    with pytest.raises(ValueError, match="fashion_mnist"):
        V.view("weak", preset="mnist")


# ---------------------------------------------------------------------------------------------------- colour

COLOR = (0.2, 0.5, 0.7)


@pytest.mark.parametrize("preset", list(V.PRESETS))
def test_weak_view_has_no_colour_change(preset):
    keras.utils.set_random_seed(3)
    out = V.view("weak", preset, size=24)(_constant(COLOR, b=64)).numpy()
    np.testing.assert_allclose(out, np.broadcast_to(COLOR, out.shape), atol=EPS)


@pytest.mark.parametrize("recipe", ["strong", "simclr", "byol1", "byol2"])
def test_strong_views_do_change_colour(recipe):
    """The counterpart of the weak-view test: the same constant image does change colour under the other recipes."""
    keras.utils.set_random_seed(3)
    out = V.view(recipe, "cifar", size=24)(_constant(COLOR, b=64)).numpy()
    per_image = out.reshape(64, -1, 3).mean(1)
    changed = np.abs(per_image - COLOR).max(1) > 0.02
    assert 0.5 < changed.mean() <= 1.0                                       # jitter p=0.8, grayscale p=0.2


def test_uint8_input_is_scaled():
    keras.utils.set_random_seed(4)
    img = tf.fill([4, 16, 16, 3], tf.constant(255, tf.uint8))
    (out,) = V.Views(("weak",), "cifar", 16)(img)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), 1.0, atol=EPS)


# ---------------------------------------------------------------------------------------------------- blur

@pytest.mark.parametrize("size", [32, 96, 224])
def test_gaussian_blur_kernel_sums_to_one(size):
    """An impulse far from the border keeps its total mass (separable kernel sums to one), is spread symmetrically
    and never grows."""
    keras.utils.set_random_seed(5)
    blur = V.GaussianBlur(size, p=1.0)
    assert blur.k % 2 == 1 and blur.k >= 3
    n = 2 * blur.k + 9
    img = np.zeros((8, n, n, 3), np.float32)
    img[:, n // 2, n // 2, :] = 1.0
    out = blur(tf.constant(img)).numpy()
    np.testing.assert_allclose(out.sum(axis=(1, 2)), 1.0, atol=1e-4)
    np.testing.assert_allclose(out, out[:, ::-1, :, :], atol=1e-6)
    np.testing.assert_allclose(out, out[:, :, ::-1, :], atol=1e-6)
    np.testing.assert_allclose(out, np.transpose(out, (0, 2, 1, 3)), atol=1e-6)
    assert np.all(out[:, n // 2, n // 2] < 1.0)
    support = np.argwhere(out[0, :, :, 0] > 1e-7)
    assert support.min() >= n // 2 - blur.k // 2 and support.max() <= n // 2 + blur.k // 2


def test_gaussian_blur_is_not_truncated():
    """The kernel reaches 3σ: at σ = 2 the blurred impulse has standard deviation 2 along each axis at 64 px (the
    former 10 %-of-size kernel gave 1.64), and a recipe can turn blur on for CIFAR-sized views (ReSSL's strong view)."""
    blur = V.GaussianBlur(64, sigma=(2.0, 2.0), p=1.0)
    assert blur.k == 13
    n = 41
    img = np.zeros((1, n, n, 1), np.float32)
    img[0, n // 2, n // 2, 0] = 1.0
    out = blur(tf.constant(img)).numpy()[0, :, :, 0]
    profile = out.sum(axis=0)
    offsets = np.arange(n) - n // 2
    assert abs(np.sqrt((profile * offsets ** 2).sum() / profile.sum()) - 2.0) < 0.03
    assert any(isinstance(l, V.GaussianBlur) for l in V.view("strong", "cifar", 32, blur=True).layers)
    assert not any(isinstance(l, V.GaussianBlur) for l in V.view("strong", "cifar", 32).layers)
    assert not any(isinstance(l, V.GaussianBlur) for l in V.view("weak", "cifar", 32, blur=True).layers)


@pytest.mark.parametrize("size", [32, 224])
def test_gaussian_blur_preserves_constant_image(size):
    """Blurring a constant image must give the same image, borders included (torchvision's GaussianBlur pads by
    reflection); zero padding would darken a k//2-pixel frame of every blurred view."""
    keras.utils.set_random_seed(6)
    blur = V.GaussianBlur(size, p=1.0)
    img = _constant(COLOR, b=4, size=size)
    out = blur(img).numpy()
    r = blur.k // 2
    np.testing.assert_allclose(out[:, r:-r, r:-r], img.numpy()[:, r:-r, r:-r], atol=1e-5)   # interior
    np.testing.assert_allclose(out, img.numpy(), atol=1e-5)                                 # whole image


def test_gaussian_blur_probability():
    keras.utils.set_random_seed(7)
    img = _random_images(b=64, size=32)
    np.testing.assert_array_equal(V.GaussianBlur(32, p=0.0)(img).numpy(), img.numpy())
    out = V.GaussianBlur(32, p=0.5)(img).numpy()
    blurred = np.abs(out - img.numpy()).reshape(64, -1).max(1) > 1e-3
    assert 0.2 < blurred.mean() < 0.8


# ---------------------------------------------------------------------------------------------------- crop geometry

def _coordinate_image(b, n=64):
    """Channel 0 = x/(n−1), channel 1 = y/(n−1), channel 2 = 0.5."""
    g = np.linspace(0.0, 1.0, n, dtype=np.float32)
    x = np.broadcast_to(g[None, :], (n, n))
    y = np.broadcast_to(g[:, None], (n, n))
    img = np.stack([x, y, np.full((n, n), 0.5, np.float32)], -1)
    return tf.constant(np.broadcast_to(img, (b, n, n, 3)).copy())


def test_random_resized_crop_is_a_sub_region():
    keras.utils.set_random_seed(8)
    b, scale, ratio = 128, (0.2, 1.0), (3 / 4, 4 / 3)
    out = V.RandomResizedCrop(32, scale, ratio)(_coordinate_image(b)).numpy()
    assert out.shape == (b, 32, 32, 3)
    xs, ys = out[..., 0], out[..., 1]
    # x only changes along the width and grows monotonically; y likewise along the height: an axis-aligned,
    # unflipped, unrotated sub-rectangle of the original
    np.testing.assert_allclose(xs, np.broadcast_to(xs[:, :1, :], xs.shape), atol=1e-5)
    np.testing.assert_allclose(ys, np.broadcast_to(ys[:, :, :1], ys.shape), atol=1e-5)
    assert np.all(np.diff(xs[:, 0, :], axis=1) > 0) and np.all(np.diff(ys[:, :, 0], axis=1) > 0)
    assert xs.min() >= -EPS and xs.max() <= 1 + EPS and ys.min() >= -EPS and ys.max() <= 1 + EPS
    np.testing.assert_allclose(out[..., 2], 0.5, atol=1e-6)
    w = xs[:, 0, -1] - xs[:, 0, 0]                                               # crop width / image width
    h = ys[:, -1, 0] - ys[:, 0, 0]
    area = w * h
    assert np.all(area >= scale[0] - 1e-3) and np.all(area <= 1 + 1e-3)
    assert np.all(w / h >= ratio[0] - 1e-3) and np.all(w / h <= ratio[1] + 1e-3)
    # the crops vary in size and position
    assert area.std() > 0.1 and xs[:, 0, 0].std() > 0.05 and ys[:, 0, 0].std() > 0.05
    assert (area < 0.5).mean() > 0.2


def test_random_resized_crop_small_scale():
    keras.utils.set_random_seed(9)
    out = V.RandomResizedCrop(16, (0.05, 0.14))(_coordinate_image(64)).numpy()
    w = out[:, 0, -1, 0] - out[:, 0, 0, 0]
    h = out[:, -1, 0, 1] - out[:, 0, 0, 1]
    assert np.all(w * h >= 0.05 - 1e-3) and np.all(w * h <= 0.14 + 1e-3)


def test_flip_reverses_x():
    keras.utils.set_random_seed(10)
    out = V.RandomFlip()(_coordinate_image(64, n=16)).numpy()
    flipped = out[:, 0, 0, 0] > 0.5
    assert 0.2 < flipped.mean() < 0.8
    np.testing.assert_allclose(out[flipped][:, 0, :, 0], np.linspace(1, 0, 16)[None].repeat(flipped.sum(), 0),
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------------- multi-crop

def test_views_small_crops_count_and_sizes(fmnist_image):
    keras.utils.set_random_seed(11)
    batch = tf.repeat(fmnist_image[None], 4, axis=0)
    layer = V.Views(("strong", "weak"), "fashion_mnist", 32, small_crops=3, small_size=16)
    assert layer.count == 5
    outs = layer(batch)
    assert len(outs) == 5
    assert [tuple(o.shape) for o in outs] == [(4, 32, 32, 3)] * 2 + [(4, 16, 16, 3)] * 3
    assert all(o.dtype == tf.float32 for o in outs)
    assert [v.name for v in layer.small] == ["view_strong_16"] * 3            # small crops use the first recipe


def test_views_small_sizes_list(fmnist_image):
    keras.utils.set_random_seed(12)
    layer = V.Views(("simclr", "simclr"), "cifar", 32, small_sizes=[24, 16, 8],
                    small_scales=[(0.1, 0.5), (0.1, 0.3), (0.05, 0.2)])
    assert layer.count == 5
    outs = layer(tf.repeat(fmnist_image[None], 2, axis=0))
    assert [o.shape[1] for o in outs] == [32, 32, 24, 16, 8]
    assert [o.shape[2] for o in outs] == [32, 32, 24, 16, 8]


def test_from_config_small_crops():
    layer = V.from_config(AugmentConfig(preset="cifar", size=24, small_crops=2, small_size=12), ("strong", "weak"))
    outs = layer(_random_images(b=2, size=24))
    assert [o.shape[1] for o in outs] == [24, 24, 12, 12]


def test_views_for_ressl_multicrop(fmnist_image):
    keras.utils.set_random_seed(13)
    cfg = tiny_config("ressl", crop_sizes=[16, 24])
    layer = methods.views_for(cfg)
    assert layer.count == 4
    outs = layer(tf.repeat(fmnist_image[None], 3, axis=0))
    assert len(outs) == 4
    assert [tuple(o.shape) for o in outs] == [(3, 32, 32, 3), (3, 32, 32, 3), (3, 16, 16, 3), (3, 24, 24, 3)]
    assert all(o.dtype == tf.float32 and float(tf.reduce_min(o)) >= -EPS and float(tf.reduce_max(o)) <= 1 + EPS
               for o in outs)
    assert [v.name for v in layer.large] == ["view_strong_32", "view_weak_32"]
    assert methods.views_for(tiny_config("simclr")).count == 2


# ---------------------------------------------------------------------------------------------------- on-device

def _per_image(batches, k):
    """Per-image mean and std of view ``k`` over a list of view tuples (batches)."""
    v = np.concatenate([np.asarray(b[k], np.float64) for b in batches])
    return v.mean(axis=(1, 2, 3)), v.std(axis=(1, 2, 3))


def _compare(a, b, floor=0.03, z=4.0):
    """Statistics of two samples of per-image (mean, std) that must agree: |Δ| ≤ max(floor, z·standard error)."""
    (ma, sa), (mb, sb) = a, b
    n = len(ma)
    rows = [  # (name, value a, value b, standard error of the difference)
        ("mean of image means", ma.mean(), mb.mean(), np.sqrt((ma.var() + mb.var()) / n)),
        ("mean of image stds", sa.mean(), sb.mean(), np.sqrt((sa.var() + sb.var()) / n)),
        ("spread of image means", ma.std(), mb.std(), np.sqrt((ma.var() + mb.var()) / (2 * n))),
        ("spread of image stds", sa.std(), sb.std(), np.sqrt((sa.var() + sb.var()) / (2 * n))),
    ]
    return [(name, x, y, max(floor, z * se)) for name, x, y, se in rows if abs(x - y) > max(floor, z * se)]


@pytest.mark.parametrize("preset", ["fashion_mnist", "imagenet"])
def test_on_device_matches_in_pipeline(fmnist_image, preset):
    """The same Views layer in a tf.data map and in a tf.function, on 4 batches of 256 copies of one real image:
    every view has the same distribution of per-image mean and std on both paths."""
    layer = V.Views(("strong", "weak", "byol1"), preset, 32, small_crops=1, small_size=16)
    batch = tf.repeat(fmnist_image[None], 256, axis=0)                         # uint8 [256,32,32,3]

    # Different global seeds: with the same one, both graphs would hand their random ops the same op seeds and the
    # comparison would hold trivially; here the two paths make independent draws.
    keras.utils.set_random_seed(14)
    in_pipeline = list(tf.data.Dataset.from_tensors(batch).repeat(4).map(layer).as_numpy_iterator())

    keras.utils.set_random_seed(15)

    @tf.function
    def on_device(x):
        return layer(x)
    on_dev = [tuple(v.numpy() for v in on_device(batch)) for _ in range(4)]

    assert len(in_pipeline) == len(on_dev) == 4
    for a, b in zip(in_pipeline[0], on_dev[0]):
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32
        assert a.min() >= -EPS and a.max() <= 1 + EPS and b.min() >= -EPS and b.max() <= 1 + EPS
    assert not np.allclose(in_pipeline[0][0], on_dev[0][0])                   # independent draws, not a copy
    assert not np.allclose(on_dev[0][0], on_dev[1][0])                         # each call draws anew
    for k in range(layer.count):
        bad = _compare(_per_image(in_pipeline, k), _per_image(on_dev, k))
        assert not bad, f"view {k}: {bad}"
    # the comparison can tell views apart: the weak view and the zoomed-in small crop differ
    assert _compare(_per_image(on_dev, 1), _per_image(on_dev, 3))


# ------------------------------------------------------------------------------- XLA-compilable crop (issue #19)

def _old_crop(images, size, scale, ratio=(3 / 4, 4 / 3)):
    """The crop before the XLA rewrite: boxes from TF's global RNG, ``tf.image.crop_and_resize`` (no XLA kernel)."""
    b = tf.shape(images)[0]
    area = tf.random.uniform([b], *scale)
    log_r = tf.random.uniform([b], np.log(ratio[0]), np.log(ratio[1]))
    h = tf.minimum(tf.sqrt(area / tf.exp(log_r)), 1.0)
    w = tf.minimum(tf.sqrt(area * tf.exp(log_r)), 1.0)
    y0, x0 = tf.random.uniform([b]) * (1.0 - h), tf.random.uniform([b]) * (1.0 - w)
    out = tf.image.crop_and_resize(images, tf.stack([y0, x0, y0 + h, x0 + w], 1), tf.range(b), [size, size])
    return out, h * w, w / h


def _within(a, b, name, z=4.0):
    """Mean and std of two samples agree within z standard errors."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    se_mean = np.sqrt(a.var() / len(a) + b.var() / len(b))
    se_std = np.sqrt(a.var() / (2 * len(a)) + b.var() / (2 * len(b)))
    assert abs(a.mean() - b.mean()) <= z * se_mean, (name, "mean", a.mean(), b.mean(), se_mean)
    assert abs(a.std() - b.std()) <= z * se_std, (name, "std", a.std(), b.std(), se_std)


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 1.0), (0.05, 0.14)])
def test_new_crop_has_the_distribution_of_the_old_one(fmnist_image, scale):
    """4096 draws each: box area and aspect, and the pixel statistics of the crops of a real image, of today's
    matmul-resampled crop (seeded, stateless) against the crop_and_resize one (global RNG)."""
    n = 4096
    images = tf.cast(tf.repeat(fmnist_image[None], n, axis=0), tf.float32) / 255.0
    keras.utils.set_random_seed(21)
    old, old_area, old_aspect = _old_crop(images, 24, scale)
    crop = V.RandomResizedCrop(24, scale)
    with V.seeded(tf.constant([5, 6], tf.int64)):
        y0, x0, h, w = crop.boxes(n)
    with V.seeded(tf.constant([5, 6], tf.int64)):
        new = crop(images)
    for name, a, b in (("area", old_area, h * w), ("aspect", old_aspect, w / h),
                       ("pixel mean", tf.reduce_mean(old, [1, 2, 3]), tf.reduce_mean(new, [1, 2, 3])),
                       ("pixel std", tf.math.reduce_std(old, [1, 2, 3]), tf.math.reduce_std(new, [1, 2, 3]))):
        _within(a.numpy(), b.numpy(), name)
    # the same boxes give the same pixels as crop_and_resize (bilinear on its sampling grid)
    same = tf.image.crop_and_resize(images[:64], tf.stack([y0, x0, y0 + h, x0 + w], 1)[:64], tf.range(64), [24, 24])
    np.testing.assert_allclose(new[:64].numpy(), same.numpy(), atol=2e-5)
    # and so do the matmuls that replace it under XLA (the on-device path)
    from tfssl.view_ops import resize_boxes
    xla = tf.function(lambda x, *box: resize_boxes(x, *box, 24), jit_compile=True)(
        images[:64], y0[:64], x0[:64], h[:64], w[:64])
    np.testing.assert_allclose(xla.numpy(), same.numpy(), atol=2e-5)


def test_flip_and_colour_statistics_match_the_stateful_draws(fmnist_image):
    """Flip rate and colour statistics over 4096 images: stateless draws (tfssl.rng, as in training) against TF's
    global RNG (the draws before issue #19) — the layers are the same, only the random source changed."""
    n = 4096
    images = tf.cast(tf.repeat(fmnist_image[None], n, axis=0), tf.float32) / 255.0
    layers = [V.RandomFlip(), V.ColorJitter(0.4, 0.4, 0.4, 0.1), V.RandomGrayscale(0.2), V.GaussianBlur(32),
              V.RandomSolarize(0.2)]
    keras.utils.set_random_seed(22)
    stateful = [layer(images) for layer in layers]
    with V.seeded(tf.constant([7, 8], tf.int64)):
        stateless = [layer(images) for layer in layers]
    for layer, a, b in zip(layers, stateful, stateless):
        for stat in (tf.reduce_mean, tf.math.reduce_std):
            _within(stat(a, [1, 2, 3]).numpy(), stat(b, [1, 2, 3]).numpy(), type(layer).__name__)
    flipped = lambda out: np.abs(out.numpy() - images.numpy()).max(axis=(1, 2, 3)) > 1e-6   # noqa: E731
    assert abs(flipped(stateful[0]).mean() - 0.5) < 0.04 and abs(flipped(stateless[0]).mean() - 0.5) < 0.04


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fashion_mnist", "imagenet"])     # gray-only jitter; every op incl. hue, blur
def test_every_recipe_compiles_with_xla_and_draws_the_tf_data_views(fmnist_image, preset):
    """Views under ``jit_compile=True`` equal the same views in a tf.data map from the same stateless seed (the
    draws and the ops agree across compile modes). byol2 has every op (crop, flip, jitter, gray, blur, solarize),
    weak the crop alone; then a warm-up schedule of two other recipes and a small crop."""
    layer = V.Views(("byol2", "weak"), preset, 32, small_crops=1, small_size=16, warmup_recipes=("strong", "simclr"),
                    warmup_steps=3)
    batch = tf.repeat(fmnist_image[None], 8, axis=0)
    compiled = tf.function(lambda x, s, t: layer(x, step=t, seed=s), jit_compile=True)
    for step in (1, 5):                                   # in the warm-up, then after it (one compile)
        seed, t = tf.constant([3, step], tf.int64), tf.constant(step, tf.int64)
        ds = tf.data.Dataset.from_tensors(batch).map(lambda x: layer(x, step=t, seed=seed))
        for a, b in zip(compiled(batch, seed, t), next(iter(ds))):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=5e-5)
