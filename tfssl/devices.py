"""The one door for device-specific choices (ARCHITECTURE.md): which train step runs where.

:func:`plan` takes the device (:func:`detect`: CPU with its ISA flags, GPU with its compute capability, TPU) and the
recipe's ``train.jit_compile``, ``train.kernels`` and ``train.precision`` (each ``auto`` or a fixed value) and
returns a :class:`Plan`: XLA or TensorFlow's graph, the convolution and BatchNorm *training* kernels, and the
precision, each with the reason. The log's ``train step:`` line prints :meth:`Plan.describe`; ``summary.json`` keeps
:meth:`Plan.as_dict`; :func:`apply_kernels` sets the backbone layers.

What ``auto`` picks, and the measurement behind it (bench/NOTES.md):

* **CPU** — one row per CPU kind in :data:`CPU_CHOICES` (the measurements are bench/NOTES.md §5 and §7 and the
  per-kind table of bench/README.md): TensorFlow's graph with oneDNN kernels, no XLA, on every kind measured
  (AVX-512: 1.2× XLA for a ResNet-18 step, §5; AVX2, emulated on an AVX-512 CPU: 1.17–1.24× XLA end to end for
  the Fashion-MNIST recipes and level for a ResNet-18 step, §7, once Grappler fuses BatchNorm + ReLU). Training
  kernels are tfssl's tuned ones, per compile mode: under XLA the closed-form BatchNorm gradient and 2 MB
  kernel-gradient chunks (§4), in the graph FusedBatchNormV3 (16-bit activations taken directly) and 8 MB chunks
  (§5), except on AVX2, whose oneDNN BatchNorm forward is slow: there an XLA forward with FusedBatchNormV3's
  gradient (:data:`CPU_GRAPH_BN`, §7m). Precision ``mixed_bfloat16`` where the CPU has bf16 arithmetic
  (``avx512_bf16`` or AMX: 1.54× per ReSSL step, §5b), float32 otherwise.
* **GPU / TPU** — XLA (a TPU has no other mode), Keras's stock layers (cuDNN / XLA's own convolutions and batch
  norm): tfssl's kernels were tuned on 2 CPU cores and never measured there. Precision: ``mixed_bfloat16`` on TPUs
  and on GPUs of compute capability ≥ 8 (Ampere and newer: bf16 tensor cores, no loss scaling), ``mixed_float16``
  on 7.x (Volta/Turing tensor cores; dynamic loss scaling), float32 on older GPUs.
* **Views in the input pipeline** (``train.views_parallelism``): batches of views tf.data makes at once, per CPU
  kind in :data:`CPU_VIEWS` (AUTOTUNE wherever measured: one batch at a time was slower, bench/NOTES.md §7j);
  accelerators keep AUTOTUNE.
* **tf.data's autotuner** on the pretraining pipeline (``train.data_autotune``), per CPU kind in
  :data:`CPU_AUTOTUNE`: off where measured on 2 cores (AVX-512 bf16, AVX2 emulated: it re-tunes at every epoch's
  new iterator and often settles where the train step loses a third of its speed, bench/NOTES.md §7k; off,
  AUTOTUNE parallelism means one call per core and prefetch buffers grow as the consumer waits); CPU kinds not
  measured and accelerator hosts keep it.

``train.kernels: stock`` forces Keras's layers everywhere; ``tuned`` forces tfssl's CPU kernels everywhere.
``ONEDNN_MAX_CPU_ISA=AVX2`` (with ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``) makes an AVX-512 CPU plan as the AVX2 CPU it
then emulates. An exported backbone always holds stock layers, whatever the plan (:func:`tfssl.export.plain_backbone`).
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

import tensorflow as tf

KERNEL_SETTINGS = ("auto", "stock", "tuned")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
CHUNK_BYTES = {True: 2 << 20, False: 8 << 20}      # conv kernel-gradient chunk under XLA / in TF's graph
# CPU kind → (jit, precision, why): measured per kind (bench/NOTES.md); a new kind gets a row once measured
CPU_CHOICES = {
    "avx512_bf16": (False, "mixed_bfloat16", "CPU with AVX-512 and bf16 arithmetic: oneDNN graph, bf16 "
                                             "(bench/NOTES.md §5, §5b, §7)"),
    "avx512": (False, "float32", "CPU with AVX-512: oneDNN graph (bench/NOTES.md §5)"),
    "avx2": (False, "float32", "CPU with AVX2: oneDNN graph, 1.17-1.24x XLA end to end (bench/NOTES.md §7)"),
    "generic": (False, "float32", "CPU without AVX2: TensorFlow's default graph (not measured)"),
}
# CPU kind → (BatchNorm training kernel of TF-graph steps, why); XLA steps use the closed form everywhere
CPU_GRAPH_BN = {
    "avx512_bf16": ("fused_v3", "FusedBatchNormV3 takes the bf16 activations directly (bench/NOTES.md §7c)"),
    "avx512": ("fused_v3", "FusedBatchNormV3 (bench/NOTES.md §5)"),
    "avx2": ("xla_forward", "an XLA forward, FusedBatchNormV3's gradient: oneDNN's AVX2 training forward is "
                            "1.5-1.9x slower (emulated AVX2, bench/NOTES.md §7m)"),
    "generic": ("fused_v3", "FusedBatchNormV3 (not measured)"),
}
# CPU kind → batches of views the input pipeline makes at once (None: tf.data's AUTOTUNE) and why
CPU_VIEWS = {
    "avx512_bf16": (None, "tf.data AUTOTUNE: 824 img/s median, one batch at a time 543 (bench/NOTES.md §7j)"),
    "avx512": (None, "tf.data AUTOTUNE (not measured against a fixed number)"),
    "avx2": (None, "tf.data AUTOTUNE (not measured against a fixed number)"),
    "generic": (None, "tf.data AUTOTUNE (not measured against a fixed number)"),
}
# CPU kind → (tf.data autotuner on the pretraining pipeline, why)
CPU_AUTOTUNE = {
    "avx512_bf16": (False, "ReSSL, MoCo v2: every epoch 810-870 img/s; with it half the epochs at 510-540 "
                           "(bench/NOTES.md §7k)"),
    "avx512": (True, "tf.data's default (not measured without it)"),
    "avx2": (False, "WCL: every epoch 208-210 img/s; with it 3 of 5 at 125-129 (emulated AVX2, bench/NOTES.md §7k)"),
    "generic": (True, "tf.data's default (not measured without it)"),
}
_ISA_ORDER = ("sse41", "avx", "avx2", "avx512_core", "avx512_core_vnni", "avx512_core_bf16", "avx512_core_amx")


@dataclass(frozen=True)
class Device:
    """What the train step runs on. ``flags``: the CPU's ISA flags (/proc/cpuinfo), after any emulation cap;
    ``compute_capability``: a GPU's (major, minor); ``emulated``: the ISA cap in effect (e.g. ``AVX2``), if any."""
    kind: str                                    # cpu | gpu | tpu
    flags: frozenset = frozenset()
    compute_capability: Optional[Tuple[int, int]] = None
    emulated: Optional[str] = None

    @property
    def cpu_kind(self) -> str:
        """``avx512_bf16`` | ``avx512`` | ``avx2`` | ``generic`` (CPUs only)."""
        if "avx512f" in self.flags:
            return "avx512_bf16" if {"avx512_bf16", "amx_bf16"} & self.flags else "avx512"
        return "avx2" if "avx2" in self.flags else "generic"

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"CPU {self.cpu_kind}" + (f" (emulated: ONEDNN_MAX_CPU_ISA={self.emulated})" if self.emulated else "")
        if self.kind == "gpu":
            return "GPU" + (f" sm_{self.compute_capability[0]}{self.compute_capability[1]}"
                            if self.compute_capability else "")
        return "TPU"


def cpu_flags(path="/proc/cpuinfo") -> frozenset:
    """The ISA flags of this (Linux) CPU; empty where /proc/cpuinfo cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cap_flags(flags, isa):
    """``flags`` as a CPU capped at ``isa`` (a ``ONEDNN_MAX_CPU_ISA`` value such as ``AVX2``) would report them."""
    isa = (isa or "").strip().lower()
    if isa not in _ISA_ORDER or isa == _ISA_ORDER[-1]:
        return frozenset(flags)
    level = _ISA_ORDER.index(isa)
    drop = set()
    if level < _ISA_ORDER.index("avx512_core"):
        drop |= {f for f in flags if f.startswith(("avx512", "amx"))}
    elif level < _ISA_ORDER.index("avx512_core_bf16"):
        drop |= {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
    if level < _ISA_ORDER.index("avx2"):
        drop |= {"avx2", "fma"}
    return frozenset(flags) - drop


def detect(strategy=None, environ=None) -> Device:
    """The device of the train step: TPU (a TPUStrategy or a visible TPU), else GPU, else this CPU."""
    environ = os.environ if environ is None else environ
    if isinstance(strategy, tf.distribute.TPUStrategy) or tf.config.list_logical_devices("TPU"):
        return Device("tpu")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        try:
            cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        except Exception:                        # details are best effort
            cc = None
        return Device("gpu", compute_capability=tuple(cc) if cc else None)
    cap = environ.get("ONEDNN_MAX_CPU_ISA")
    flags = cpu_flags()
    capped = cap_flags(flags, cap)
    return Device("cpu", capped, emulated=cap.upper() if cap and capped != flags else None)


@dataclass(frozen=True)
class Plan:
    """The train step's device choices; ``reasons`` maps each of jit / kernels / precision to why."""
    device: str
    jit: bool
    conv: str                                    # stock | chunked
    conv_chunk_bytes: Optional[int]              # kernel-gradient chunk of ``chunked``
    batch_norm: str                              # stock | fused_v3 | closed_form | xla_forward
    precision: str
    reasons: Dict[str, str] = field(default_factory=dict)
    views_parallelism: Optional[int] = None      # batches of views the input pipeline makes at once; None: AUTOTUNE
    data_autotune: bool = True                   # tf.data's autotuner on the pretraining input pipeline

    def describe(self) -> str:
        """The ``train step:`` log line."""
        conv = "stock" if self.conv == "stock" else f"chunked kernel gradient ({self.conv_chunk_bytes >> 20} MB)"
        return (f"{'XLA' if self.jit else 'TF graph, no XLA'} ({self.reasons['jit']}); conv {conv}, BatchNorm "
                f"{self.batch_norm} ({self.reasons['kernels']}); {self.precision} ({self.reasons['precision']}); "
                f"views {self.views_parallelism or 'AUTOTUNE'} in flight ({self.reasons['views']}), tf.data autotuner "
                f"{'on' if self.data_autotune else 'off'} ({self.reasons['autotune']}) on {self.device}")

    def as_dict(self) -> dict:
        return asdict(self)


def _jit(device, setting, multi_worker, deterministic=False):
    if multi_worker and device.kind == "cpu":
        return False, "multi-worker on CPU: XLA:CPU has no collectives"
    if deterministic:          # Keras's compile() silently drops XLA while TensorFlow's deterministic ops are on
        if setting is True:
            raise ValueError("train.deterministic=true and train.jit_compile=true: Keras compiles no XLA step under "
                             "TensorFlow's deterministic ops; set train.jit_compile=auto (or false) or "
                             "train.deterministic=false")
        return False, "train.deterministic: Keras runs no XLA under deterministic ops"
    if setting != "auto":
        return bool(setting), "train.jit_compile"
    if device.kind == "tpu":
        return True, "auto: TPU"
    if device.kind == "gpu":
        return True, "auto: GPU"
    jit, _, why = CPU_CHOICES[device.cpu_kind]
    return jit, f"auto: {why}"


def _kernels(device, setting, jit):
    """(conv, chunk bytes, batch_norm, reason). ``xla_forward`` BatchNorm is for CPUs only (its gradient op reads
    the variance where cuDNN reads the inverse variance), so ``tuned`` on an accelerator gets ``fused_v3``."""
    if setting not in KERNEL_SETTINGS:
        raise ValueError(f"train.kernels={setting!r} is not one of {', '.join(KERNEL_SETTINGS)}")
    bn, why_bn = ("closed_form", "closed-form BatchNorm") if jit else \
        CPU_GRAPH_BN[device.cpu_kind] if device.kind == "cpu" else ("fused_v3", "FusedBatchNormV3")
    tuned = ("chunked", CHUNK_BYTES[jit], bn)
    if setting == "stock":
        return "stock", None, "stock", "train.kernels=stock"
    if setting == "tuned":
        return (*tuned, "train.kernels=tuned")
    if device.kind != "cpu":
        return "stock", None, "stock", f"auto: {device.kind.upper()}, Keras's layers (tfssl's kernels are CPU-tuned)"
    return (*tuned, f"auto: CPU {'XLA' if jit else 'graph'} kernels (bench/NOTES.md §{'4' if jit else '5'}), "
                    f"BatchNorm: {why_bn}")


def _precision(device, setting):
    if setting != "auto":
        if setting not in PRECISIONS:
            raise ValueError(f"train.precision={setting!r} is not one of auto, {', '.join(PRECISIONS)}")
        return setting, "train.precision"
    if device.kind == "tpu":
        return "mixed_bfloat16", "auto: TPU (bf16 MXU)"
    if device.kind == "gpu":
        major = (device.compute_capability or (0, 0))[0]
        if major >= 8:
            return "mixed_bfloat16", "auto: GPU sm_80+ (bf16 tensor cores)"
        if major == 7:
            return "mixed_float16", "auto: GPU sm_7x (fp16 tensor cores, loss scaling)"
        return "float32", "auto: GPU without tensor cores"
    precision = CPU_CHOICES[device.cpu_kind][1]
    return precision, ("auto: CPU with bf16 arithmetic (bench/NOTES.md §5b)" if precision == "mixed_bfloat16" else
                       "auto: CPU without bf16 arithmetic")


def _views(device, setting):
    """(batches of views in flight, reason) of the pretraining input pipeline's views map."""
    if setting == "autotune":
        return None, "train.views_parallelism"
    if setting != "auto":
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ValueError(f"train.views_parallelism={setting!r} is not auto, autotune or a positive number of "
                             f"batches")
        return setting, "train.views_parallelism"
    if device.kind != "cpu":
        return None, f"auto: {device.kind.upper()}, tf.data AUTOTUNE"
    calls, why = CPU_VIEWS[device.cpu_kind]
    return calls, f"auto: {why}"


def _autotune(device, setting):
    """(tf.data's autotuner on or off for the pretraining pipeline, reason)."""
    if setting != "auto":
        if not isinstance(setting, bool):
            raise ValueError(f"train.data_autotune={setting!r} is not auto, true or false")
        return setting, "train.data_autotune"
    if device.kind != "cpu":
        return True, f"auto: {device.kind.upper()} host, tf.data's default"
    on, why = CPU_AUTOTUNE[device.cpu_kind]
    return on, f"auto: {why}"


def plan(device: Device, jit_compile="auto", kernels="auto", precision="float32", multi_worker=False,
         deterministic=False, views="auto", autotune="auto") -> Plan:
    """The :class:`Plan` for ``device`` and the recipe's settings (see the module docstring for ``auto``);
    ``deterministic`` (TensorFlow's deterministic ops) rules XLA out, as Keras does; ``views``: the recipe's
    ``train.views_parallelism``; ``autotune``: its ``train.data_autotune``."""
    jit, why_jit = _jit(device, jit_compile, multi_worker, deterministic)
    conv, chunk, bn, why_kernels = _kernels(device, kernels, jit)
    prec, why_prec = _precision(device, precision)
    calls, why_views = _views(device, views)
    tune, why_tune = _autotune(device, autotune)
    return Plan(device.describe(), jit, conv, chunk, bn, prec, {"jit": why_jit, "kernels": why_kernels,
                "precision": why_prec, "views": why_views, "autotune": why_tune}, calls, tune)


def apply_kernels(model, the_plan: Plan) -> None:
    """Set every tfssl BatchNorm and Conv2D layer of ``model`` to the plan's training kernels (takes effect at the
    next trace; a method's ``make_train_function`` calls it)."""
    from tfssl.backbones import ChunkedGradConv2D, FusedBatchNormalization
    for layer in model._flatten_layers():
        if isinstance(layer, FusedBatchNormalization):
            layer.kernel = the_plan.batch_norm
        elif isinstance(layer, ChunkedGradConv2D):
            layer.chunk_bytes = the_plan.conv_chunk_bytes


def first_unsupported_op(error) -> Optional[str]:
    """The op an XLA compile error names (``… CropAndResize (No registered 'CropAndResize' OpKernel for XLA_…``)."""
    text = str(error)
    for pattern in (r"No registered '(\w+)' OpKernel for XLA", r"unsupported operations[^:]*:\s*(\w+)",
                    r"(\w+) \(No registered"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None
