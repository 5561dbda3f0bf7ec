"""ResNet backbones (He et al. 2016) as Keras functional models taking float images in [0, 1].

Input normalisation (dataset mean/std) is the first layer, so an exported backbone takes raw images. Options: CIFAR
stem (3×3 stride-1 conv, no max-pool) for small images, a width multiplier, synchronized BatchNorm, and the stage-3
feature map as a second output (CsMl's multi-level head needs it).
"""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

SPECS = {  # block type, blocks per stage, base widths
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": ("basic", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512)),
    "tiny": ("basic", (1, 1, 1, 1), (8, 16, 32, 64)),
}


def feature_dim(name: str, width: float = 1.0) -> int:
    """Size of the pooled features of backbone ``name``."""
    kind, _, widths = SPECS[name]
    return int(widths[-1] * width) * (4 if kind == "bottleneck" else 1)


@keras.saving.register_keras_serializable(package="tfssl")
class SyncBatchNormalization(layers.BatchNormalization):
    """BatchNorm whose batch statistics span all replicas, computed in two passes.

    Keras's ``synchronized=True`` computes var = E[x²] − E[x]² from all-reduced sums, which loses float32 precision
    when the variance is small next to the mean (small late-stage maps, multi-crop) and so differs from one device's
    ``tf.nn.moments``. Here the global mean is all-reduced first, then the global sum of squared deviations, so N
    replicas × B/N give the statistics of one device × B. On one replica it is plain BatchNormalization.
    """

    def _moments(self, inputs, mask):
        ctx = tf.distribute.get_replica_context()
        if mask is not None or ctx is None or ctx.num_replicas_in_sync == 1:
            return super()._moments(inputs, mask)
        x = tf.cast(inputs, tf.float32)
        axes = list(self._reduction_axes)
        count = ctx.all_reduce("sum", tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32))
        mean = ctx.all_reduce("sum", tf.reduce_sum(x, axis=axes, keepdims=True)) / count
        variance = ctx.all_reduce("sum", tf.reduce_sum(tf.square(x - mean), axis=axes, keepdims=True)) / count
        return (tf.cast(tf.squeeze(mean, axes), inputs.dtype), tf.cast(tf.squeeze(variance, axes), inputs.dtype))


def _bn(sync, name, zero=False):
    cls = SyncBatchNormalization if sync else layers.BatchNormalization
    return cls(momentum=0.9, epsilon=1e-5, name=name, gamma_initializer="zeros" if zero else "ones")


def _conv(filters, k, stride, name):
    # a fresh initializer per layer: one shared Keras 3 initializer object draws the *same* kernel for every layer
    # of the same shape, ignoring keras.utils.set_random_seed (He et al. fan-out normal, as torchvision's ResNet)
    init = keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")
    return layers.Conv2D(filters, k, strides=stride, padding="same", use_bias=False, kernel_initializer=init,
                         name=name)


def _block(x, kind, filters, stride, sync, name):
    out_ch = filters * (4 if kind == "bottleneck" else 1)
    shortcut = x
    if stride != 1 or x.shape[-1] != out_ch:
        shortcut = _bn(sync, name + "_down_bn")(_conv(out_ch, 1, stride, name + "_down")(x))
    if kind == "basic":
        y = layers.ReLU()(_bn(sync, name + "_bn1")(_conv(filters, 3, stride, name + "_conv1")(x)))
        y = _bn(sync, name + "_bn2", zero=False)(_conv(filters, 3, 1, name + "_conv2")(y))
    else:
        y = layers.ReLU()(_bn(sync, name + "_bn1")(_conv(filters, 1, 1, name + "_conv1")(x)))
        y = layers.ReLU()(_bn(sync, name + "_bn2")(_conv(filters, 3, stride, name + "_conv2")(y)))
        y = _bn(sync, name + "_bn3")(_conv(out_ch, 1, 1, name + "_conv3")(y))
    return layers.ReLU(name=name + "_out")(layers.Add()([shortcut, y]))


def build_backbone(name="resnet18", cifar_stem=True, width=1.0, sync_bn=False, channels=3,
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), with_stage3=False, model_name="backbone"):
    """A ResNet mapping images [B,H,W,channels] in [0,1] to pooled features [B, feature_dim(name, width)].

    With ``with_stage3`` the model returns ``(pooled, stage3_map)``. Any H, W (global average pooling).
    """
    if name not in SPECS:
        raise ValueError(f"model.backbone={name!r} is not one of {', '.join(SPECS)}")
    kind, blocks, widths = SPECS[name]
    inputs = keras.Input((None, None, channels), name="images")
    mean, std = list(mean)[:channels], list(std)[:channels]
    x = layers.Normalization(mean=mean, variance=[s * s for s in std], name="normalize")(inputs)
    stem = max(8, int(64 * width)) if name != "tiny" else int(widths[0] * width)
    if cifar_stem:
        x = _conv(stem, 3, 1, "stem_conv")(x)
        x = layers.ReLU()(_bn(sync_bn, "stem_bn")(x))
    else:
        x = _conv(stem, 7, 2, "stem_conv")(x)
        x = layers.ReLU()(_bn(sync_bn, "stem_bn")(x))
        x = layers.MaxPooling2D(3, 2, padding="same")(x)
    stage3 = None
    for s, (n, w) in enumerate(zip(blocks, widths)):
        for i in range(n):
            x = _block(x, kind, int(w * width), 2 if (i == 0 and s > 0) else 1, sync_bn, f"s{s + 1}b{i + 1}")
        if s == 2:
            stage3 = x
    pooled = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, (pooled, stage3) if with_stage3 else pooled, name=model_name)


def stage3_model(backbone, model_name=None):
    """A model sharing ``backbone``'s layers that returns (pooled features, stage-3 feature map)."""
    s3 = max((l.name for l in backbone.layers if l.name.startswith("s3b") and l.name.endswith("_out")),
             key=lambda n: int(n[3:-4]))
    return keras.Model(backbone.input, (backbone.outputs[0], backbone.get_layer(s3).output),
                       name=model_name or backbone.name + "_levels")


def build_stage_head(name, width=1.0, blocks=2, sync_bn=False, channels=None, model_name="stage3_head"):
    """CsMl's stage-3 head (reconstructed, METHODS.md CsMl 6): a slim copy of stage 4 — ``blocks`` blocks of the
    backbone's kind at stage-4 width, the first with stride 2 — then global average pooling.

    ``channels``: the stage-3 map's channels (default: the backbone's). Returns pooled [B, feature_dim]."""
    kind, _, widths = SPECS[name]
    c3 = channels or int(widths[2] * width) * (4 if kind == "bottleneck" else 1)
    inputs = keras.Input((None, None, c3), name="stage3")
    x = inputs
    for i in range(blocks):
        x = _block(x, kind, int(widths[3] * width), 2 if i == 0 else 1, sync_bn, f"{model_name}_b{i + 1}")
    return keras.Model(inputs, layers.GlobalAveragePooling2D(name=f"{model_name}_pool")(x), name=model_name)


def build_mlp(dims, batch_norm=False, last_bn=False, sync_bn=False, name="projector"):
    """Linear(d0,d1)-[BN]-ReLU-…-Linear(dn−1,dn): ``dims`` = (hidden…, out). Input dim is inferred."""
    model = keras.Sequential(name=name)
    for i, d in enumerate(dims):
        last = i == len(dims) - 1
        model.add(layers.Dense(d, use_bias=not (batch_norm and (not last or last_bn)), name=f"{name}_fc{i + 1}"))
        if batch_norm and (not last or last_bn):
            model.add(_bn(sync_bn, f"{name}_bn{i + 1}"))
        if not last:
            model.add(layers.ReLU())
    return model
