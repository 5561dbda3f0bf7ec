"""ResNet backbones (He et al. 2016) as Keras functional models taking float images in [0, 1].

Input normalisation (dataset mean/std) is the first layer, so an exported backbone takes raw images. Options: CIFAR
stem (3×3 stride-1 conv, no max-pool) for small images, a width multiplier, synchronized BatchNorm, and the stage-3
feature map as a second output (CsMl's multi-level head needs it).
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import layers

SPECS = {  # block type, blocks per stage, base widths
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": ("basic", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512)),
    "tiny": ("basic", (1, 1, 1, 1), (8, 16, 32, 64)),
    "small": ("basic", (1, 1, 1, 1), (32, 64, 128, 256)),    # 28-32 px images on CPUs: bench/QUALITY.md
}


def feature_dim(name: str, width: float = 1.0) -> int:
    """Size of the pooled features of backbone ``name``."""
    kind, _, widths = SPECS[name]
    return int(widths[-1] * width) * (4 if kind == "bottleneck" else 1)


def batch_norm_train(x, gamma, beta, epsilon):
    """Training-mode batch normalisation over every axis but the last, with a closed-form gradient.

    y = γ·x̂ + β with x̂ = (x − μ)/√(σ² + ε), μ and σ² the (biased) batch mean and variance computed in two passes
    as ``tf.nn.moments`` (Ioffe & Szegedy 2015, Alg. 1). Returns (y, μ, σ²); μ and σ² carry no gradient (they feed
    the moving statistics). The backward pass is the textbook one (Alg. 1's chain rule, simplified):
    ∂β = Σ g, ∂γ = Σ g·x̂, ∂x = γ/√(σ² + ε) · (g − mean(g) − x̂·mean(g·x̂)), with every reduction over the M rows.
    Autodiff of the moments instead yields more, separately fused passes over the activation, which XLA:CPU emits
    as slow reduce-window loops (bench/NOTES.md §4); the result is the same to float32 rounding.
    """
    shape, channels = tf.shape(x), x.shape[-1]

    @tf.custom_gradient
    def bn(x, gamma, beta):
        rows = tf.reshape(x, (-1, channels))
        m = tf.cast(tf.shape(rows)[0], x.dtype)
        mean = tf.reduce_sum(rows, 0) / m
        centred = rows - mean
        variance = tf.reduce_sum(centred * centred, 0) / m
        inv = tf.math.rsqrt(variance + epsilon)
        xhat = centred * inv

        def grad(g, _dmean, _dvariance):
            g = tf.reshape(g, (-1, channels))
            g_sum, gx_sum = tf.reduce_sum(g, 0), tf.reduce_sum(g * xhat, 0)
            dx = (gamma * inv) * (g - g_sum / m - xhat * (gx_sum / m))
            return tf.reshape(dx, shape), gx_sum, g_sum
        return (tf.reshape(xhat * gamma + beta, shape), mean, variance), grad

    y, mean, variance = bn(x, gamma, beta)
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance)


def batch_norm_fused(x, gamma, beta, epsilon):
    """Training-mode batch normalisation by TensorFlow's ``FusedBatchNormV3`` op (oneDNN on CPU, cuDNN on GPU),
    over every axis but the last. Returns (y, μ, σ²) like :func:`batch_norm_train`: σ² biased, as
    ``tf.nn.moments`` (the op reports the Bessel-corrected n/(n−1)·σ², undone here); μ, σ² carry no gradient.
    Outside XLA this one kernel pair beats both autodiff's and the closed-form chain of separate ops (bench/NOTES.md
    §5); under XLA the closed form fuses better. Grappler may fuse the following ReLU into the op, whose ReLU maps
    NaN to 0 on oneDNN CPUs: a NaN batch statistic then need not reach the features, but it reaches the gradients of
    γ and β, and the train step's loss carries every gradient (:meth:`SSLMethod.train_step`), so ``train.on_nan``
    still sees it (§7: the former per-layer guard, an extra pass over every activation, cost 20 % of a bf16 step).
    """
    four_d = x.shape.rank == 4
    rows = x if four_d else tf.reshape(x, (-1, 1, 1, x.shape[-1]))    # the op wants 4-D NHWC: any rank works so
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(rows, gamma, beta, epsilon=epsilon, is_training=True)[:3]
    n = tf.cast(tf.size(rows) // tf.shape(rows)[-1], variance.dtype)
    variance = variance * tf.maximum(n - 1.0, 1.0) / n
    return y if four_d else tf.reshape(y, tf.shape(x)), tf.stop_gradient(mean), tf.stop_gradient(variance)


@tf.function(jit_compile=True)
def _bn_forward_xla(x, gamma, beta, epsilon):
    """y = γ·x̂ + β and the batch's μ, σ² (two passes, as :func:`batch_norm_train`) for rows x [M, C], compiled by
    XLA into fused loops: three passes over the activation where oneDNN's training kernel is slow (§7m)."""
    m = tf.cast(tf.shape(x)[0], x.dtype)
    mean = tf.reduce_sum(x, 0) / m
    centred = x - mean
    variance = tf.reduce_sum(centred * centred, 0) / m
    return centred * (gamma * tf.math.rsqrt(variance + epsilon)) + beta, mean, variance


def batch_norm_xla_forward(x, gamma, beta, epsilon):
    """Training-mode batch normalisation whose forward pass is a small XLA cluster (:func:`_bn_forward_xla`)
    inside the TF-graph step and whose backward pass is TensorFlow's ``FusedBatchNormGradV3`` kernel (oneDNN on x86
    CPUs).
    Returns (y, μ, σ²) like :func:`batch_norm_train`, σ² biased; μ, σ² carry no gradient.

    The gradient op takes the forward's batch mean and variance as its reserve spaces: on CPUs the (biased) variance,
    as its op definition says, where cuDNN wants the inverse variance; so this kernel is for CPU steps only and the
    device plan picks it only for the CPU kinds where it was measured faster (:data:`tfssl.devices.CPU_GRAPH_BN`:
    AVX2, whose oneDNN training forward is 1.5-1.9× slower than these fused loops, bench/NOTES.md §7m).
    """
    channels = x.shape[-1]
    rows = x if x.shape.rank == 4 else tf.reshape(x, (-1, 1, 1, channels))   # the gradient op wants 4-D NHWC
    epsilon = float(epsilon)

    @tf.custom_gradient
    def bn(rows, gamma, beta):
        y, mean, variance = _bn_forward_xla(tf.reshape(rows, (-1, channels)), gamma, beta, epsilon)

        def grad(dy, _dmean, _dvariance):
            dx, dgamma, dbeta = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=tf.reshape(dy, tf.shape(rows)), x=rows, scale=gamma, reserve_space_1=mean,
                reserve_space_2=variance, reserve_space_3=tf.zeros([0], rows.dtype), epsilon=epsilon,
                is_training=True)[:3]
            return dx, dgamma, dbeta
        return (y, mean, variance), grad
    y, mean, variance = bn(rows, gamma, beta)
    return tf.reshape(y, tf.shape(x)), tf.stop_gradient(mean), tf.stop_gradient(variance)


@keras.saving.register_keras_serializable(package="tfssl")
class FusedBatchNormalization(layers.BatchNormalization):
    """BatchNormalization whose training step is one of three fused kernels (statistics of this replica's batch):
    ``kernel = "closed_form"`` (:func:`batch_norm_train`, the closed-form gradient; for XLA-compiled steps),
    ``"fused_v3"`` (TensorFlow's ``FusedBatchNormV3``, :func:`batch_norm_fused`; for TF-graph steps, the default) or
    ``"xla_forward"`` (:func:`batch_norm_xla_forward`: an XLA forward in TF-graph steps, CPUs only), or ``"stock"``
    (Keras's own training path). The device plan sets it (:func:`tfssl.devices.apply_kernels`).

    Same variables, config, moving-statistics update and inference path as Keras's layer; only the training-mode
    forward/backward is written out. Masks and renorm fall back to Keras's implementation. Exported backbones
    swap it for the stock layer (:func:`tfssl.export.plain_backbone`).
    """
    kernel = "fused_v3"

    def _fused_ok(self, training, mask):
        return self.kernel != "stock" and bool(training) and self.trainable and mask is None and not self.renorm and self.scale and self.center

    def call(self, inputs, training=None, mask=None):
        last_axis_only = list(self._reduction_axes) == list(range(len(inputs.shape) - 1))
        if not (last_axis_only and self._fused_ok(training, mask)):
            return super().call(inputs, training=training, mask=mask)
        if self.kernel in ("closed_form", "xla_forward"):   # float32 statistics under mixed precision, as Keras
            fn = batch_norm_train if self.kernel == "closed_form" else batch_norm_xla_forward
            y, mean, variance = fn(tf.cast(inputs, tf.float32), tf.cast(self.gamma, tf.float32),
                                   tf.cast(self.beta, tf.float32), self.epsilon)
        else:   # FusedBatchNormV3 takes 16-bit x with float32 γ, β and accumulates in float32: no casts (§7)
            x = inputs if inputs.dtype in (tf.bfloat16, tf.float16) else tf.cast(inputs, tf.float32)
            y, mean, variance = batch_norm_fused(x, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32),
                                                 self.epsilon)
        m = self.momentum                         # the moving statistics are float32 variables
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + variance * (1.0 - m))
        return tf.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package="tfssl")
class SyncBatchNormalization(FusedBatchNormalization):
    """BatchNorm whose batch statistics span all replicas, computed in two passes.

    Keras's ``synchronized=True`` computes var = E[x²] − E[x]² from all-reduced sums, which loses float32 precision
    when the variance is small next to the mean (small late-stage maps, multi-crop) and so differs from one device's
    ``tf.nn.moments``. Here the global mean is all-reduced first, then the global sum of squared deviations, so N
    replicas × B/N give the statistics of one device × B. On one replica it is :class:`FusedBatchNormalization`.
    """

    def _fused_ok(self, training, mask):
        ctx = tf.distribute.get_replica_context()
        return super()._fused_ok(training, mask) and (ctx is None or ctx.num_replicas_in_sync == 1)

    def _moments(self, inputs, mask):
        ctx = tf.distribute.get_replica_context()
        if mask is not None or ctx is None or ctx.num_replicas_in_sync == 1:
            return super()._moments(inputs, mask)
        x = tf.cast(inputs, tf.float32)
        axes = list(self._reduction_axes)
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
        total = tf.reduce_sum(x, axis=axes, keepdims=True)
        # two collectives per call: [Σx, n] together, then Σ(x − μ)² (the second pass needs the global μ)
        sums = ctx.all_reduce("sum", tf.concat([tf.reshape(total, [-1]), [count]], 0))
        mean = tf.reshape(sums[:-1] / sums[-1], tf.shape(total))
        variance = ctx.all_reduce("sum", tf.reduce_sum(tf.square(x - mean), axis=axes, keepdims=True)) / sums[-1]
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
        return tf.cast(mean, inputs.dtype), tf.cast(variance, inputs.dtype)


def conv2d_chunked_grad(x, kernel, stride, chunk_bytes=2 << 20):
    """``tf.nn.conv2d(x, kernel, stride, "SAME")`` whose kernel gradient is summed over chunks of the batch.

    Forward and input gradient are the usual ones (∂x = conv2d_transpose(g, kernel)); the kernel gradient
    ∂W = Σ_n x_n ⋆ g_n (the correlation of each image with its output gradient) is split into sums over chunks of
    images whose activations take at most ``chunk_bytes``: XLA:CPU computes ∂W with the input transposed to
    batch-minor layout, and on a whole ResNet stage-1 batch that transpose is cache-hostile (bench/NOTES.md §4).
    A batch of unknown size is one chunk. The result equals the unchunked gradient up to float32 summation order.
    """
    x, kernel = tf.convert_to_tensor(x), tf.convert_to_tensor(kernel)   # a Keras kernel variable → its value
    n = x.shape[0]
    per_image = max(1, math.prod(x.shape[1:]) * x.dtype.size)
    chunk = max(1, chunk_bytes // per_image)

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(g):
            dx = tf.nn.conv2d_transpose(g, kernel, tf.shape(x), stride, "SAME")
            parts = [(x, g)] if n is None or chunk >= n else \
                [(x[i:i + chunk], g[i:i + chunk]) for i in range(0, n, chunk)]
            dw = tf.add_n([tf.raw_ops.Conv2DBackpropFilter(input=xi, filter_sizes=tf.shape(kernel), out_backprop=gi,
                                                            strides=[1, stride, stride, 1], padding="SAME")
                           for xi, gi in parts])
            return dx, dw
        return tf.nn.conv2d(x, kernel, stride, "SAME"), grad
    return conv(x, kernel)


@keras.saving.register_keras_serializable(package="tfssl")
class ChunkedGradConv2D(layers.Conv2D):
    """Keras Conv2D (``same`` padding, square stride, no dilation or groups, channels-last) whose kernel gradient
    is :func:`conv2d_chunked_grad` over batch chunks of ≤ ``chunk_bytes`` (8 MB by default, the TF-graph setting;
    2 MB for XLA; None: Keras's convolution). The device plan sets it (:func:`tfssl.devices.apply_kernels`);
    anything but the simple case is Keras's convolution too. Exports swap it for the stock layer."""
    chunk_bytes = 8 << 20

    def convolution_op(self, inputs, kernel):
        simple = (self.padding == "same" and self.data_format == "channels_last" and self.groups == 1
                  and self.strides[0] == self.strides[1] and tuple(self.dilation_rate) == (1, 1)
                  and None not in inputs.shape[1:])
        if not simple or self.chunk_bytes is None:
            return super().convolution_op(inputs, kernel)
        return conv2d_chunked_grad(inputs, kernel, self.strides[0], self.chunk_bytes)


def _bn(sync, name, zero=False):
    cls = SyncBatchNormalization if sync else FusedBatchNormalization
    return cls(momentum=0.9, epsilon=1e-5, name=name, gamma_initializer="zeros" if zero else "ones")


def _conv(filters, k, stride, name):
    # a fresh initializer per layer: one shared Keras 3 initializer object draws the *same* kernel for every layer
    # of the same shape, ignoring keras.utils.set_random_seed (He et al. fan-out normal, as torchvision's ResNet)
    init = keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")
    return ChunkedGradConv2D(filters, k, strides=stride, padding="same", use_bias=False, kernel_initializer=init,
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
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), with_stage3=False, model_name="backbone",
                   stem_pool=False):
    """A ResNet mapping images [B,H,W,channels] in [0,1] to pooled features [B, feature_dim(name, width)].

    With ``with_stage3`` the model returns ``(pooled, stage3_map)``. Any H, W (global average pooling).
    ``stem_pool`` keeps the 3×3 stride-2 max-pool after a CIFAR stem (ReSSL's STL-10 and Tiny-ImageNet code).
    """
    if name not in SPECS:
        raise ValueError(f"model.backbone={name!r} is not one of {', '.join(SPECS)}")
    kind, blocks, widths = SPECS[name]
    inputs = keras.Input((None, None, channels), name="images")
    mean, std = list(mean)[:channels], list(std)[:channels]
    x = layers.Normalization(mean=mean, variance=[s * s for s in std], name="normalize")(inputs)
    stem = max(8, int(64 * width)) if name not in ("tiny", "small") else int(widths[0] * width)
    if cifar_stem:
        x = _conv(stem, 3, 1, "stem_conv")(x)
        x = layers.ReLU()(_bn(sync_bn, "stem_bn")(x))
        if stem_pool:
            x = layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)
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
