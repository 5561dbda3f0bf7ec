"""Typed run configuration: YAML recipes validated into dataclasses, with ``--set section.key=value`` overrides.

A recipe has the sections ``method, model, data, augment, train, eval, export, distribute``. Every key is checked
against the dataclass of its section (and, for ``method``, against the parameter dataclass of the chosen method), so an
unknown key, a wrong type or a bad choice is one :class:`ConfigError` that names the key and the valid choices.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key/file and the fix."""


@dataclass
class ModelConfig:
    backbone: str = "resnet18"          # resnet18 | resnet34 | resnet50 | small (32-64-128-256) | tiny (8-16-32-64)
    cifar_stem: bool = True             # 3x3 stride-1 conv, no max-pool (small images)
    stem_pool: bool = False             # keep a 3x3/2 max-pool after the CIFAR stem (ReSSL's STL-10/Tiny-ImageNet)
    width: float = 1.0                  # width multiplier of every stage
    sync_bn: bool = True                # BatchNormalization(synchronized=True) under multi-replica strategies
    projector_hidden: int = 2048
    projector_dim: int = 128
    projector_bn: bool = False          # BN after the hidden layer (SimCLR/WCL style)


@dataclass
class DataConfig:
    name: str = "fashion_mnist"         # fashion_mnist | tfds:<name> | folder | numpy
    path: Optional[str] = None          # idx dir (fashion_mnist), image folder, or .npz file
    data_dir: Optional[str] = None      # TFDS data_dir
    test_path: Optional[str] = None     # folder source: optional held-out folder
    limit: Optional[int] = None         # use only the first N training images
    test_limit: Optional[int] = None    # use only the first N held-out images (kNN monitor)
    image_size: int = 32                # fixed-size sources: images resized to this; originals: eval short side
    crop_size: Optional[int] = None     # originals: centre crop of the evaluation view (ImageNet: 224 of 256)
    originals: Any = "auto"             # crop the views from the original images: auto (when sizes vary) | true | false
    pretrain_split: str = "train"       # TFDS split(s) of pretraining, e.g. train+unlabelled (STL-10)
    eval_split: str = "train"           # TFDS labelled split of the protocols (kNN bank, linear, fine-tuning)
    test_split: Optional[str] = None    # TFDS held-out split (None: test, else validation)
    channels: int = 3                   # 3 = grayscale images are replicated to RGB
    shuffle_buffer: int = 10000
    seed: Optional[int] = 0
    download: bool = False              # allow TFDS to download (never in tests)
    on_corrupt: str = "skip"            # skip | error


@dataclass
class AugmentConfig:
    preset: str = "fashion_mnist"       # fashion_mnist | cifar | stl10 | imagenet
    size: int = 32                      # output size of the large crops
    on_device: bool = False             # run the views inside train_step instead of the tf.data pipeline
    blur: Optional[bool] = None         # Gaussian blur in the strong views (None: the preset's choice)
    crop_scale: Optional[List[float]] = None   # area range of the large views' RandomResizedCrop (None: the
    #                                            recipe's, (0.2, 1) or SimCLR's (0.08, 1))
    small_crops: int = 0                # multi-crop: number of small student crops
    small_size: int = 16
    small_scale: List[float] = field(default_factory=lambda: [0.05, 0.14])
    extra: List[Any] = field(default_factory=list)   # Keras core / keras-cv layers appended to the views:
    #                                                  [{layer: keras_cv.layers.RandAugment, args: {...}, recipes: [strong]}]


@dataclass
class TrainConfig:
    epochs: int = 10
    steps_per_epoch: Optional[int] = None   # None = one pass over the (limited) training set
    batch_size: int = 256                   # global batch, split over replicas
    optimizer: str = "sgd"                  # sgd | lars | lamb
    lr: float = 0.06                        # base learning rate, scaled by lr_scaling
    lr_scaling: str = "linear"              # linear (lr*B/256) | sqrt (lr*sqrt(B)) | none
    weight_decay: float = 5e-4
    wd_exclude: List[str] = field(default_factory=lambda: ["bn", "bias"])   # [] decays every variable
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    probe_lr: float = 0.1
    seed: int = 0
    jit_compile: Any = "auto"               # true | false | auto: XLA on TPU/GPU, on a CPU unless AVX-512 (NOTES.md 5)
    kernels: str = "auto"                   # conv/BatchNorm training kernels: auto (tfssl.devices) | stock | tuned
    precision: str = "float32"              # float32 | mixed_bfloat16 | mixed_float16 | auto (tfssl.devices)
    resume: bool = True                     # continue from RUN/backup after a kill (same command, same recipe)
    deterministic: bool = False             # TensorFlow's deterministic ops (bit-identical reruns; slower)
    on_nan: str = "stop"                    # non-finite loss: stop (keep the last good backup) | skip the update
    knn_every: int = 1                      # run the kNN monitor every N epochs (0 = only at the end)
    max_minutes: Optional[float] = None     # stop after this many training minutes (the schedule keeps epochs)
    views_parallelism: Any = "auto"         # batches of views made at once in the input pipeline: auto (per device,
    #                                         tfssl.devices) | autotune (tf.data's) | N
    data_autotune: Any = "auto"             # tf.data's autotuner on the pretraining pipeline: auto (per device,
    #                                         tfssl.devices) | true | false
    verbose: int = 1


@dataclass
class EvalConfig:
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_train_limit: Optional[int] = None   # memory bank size for the kNN monitor (None = all training images)
    majority_k: int = 20                    # plain majority-vote kNN (tfssl eval knn)
    epochs: Optional[int] = None            # epochs of tfssl eval linear/semi (None: the protocol's own)
    batch_size: int = 256                   # embedding batch of every protocol
    val_fraction: float = 0.1               # linear: validation split carved from train (never the test set)
    linear_preset: str = "small"            # small (tfssl's, quick) | ressl | ressl_small | wcl | moco | csml | simclr
    linear_augment: Optional[bool] = None   # linear: fresh crop+flip views each epoch (the papers) or cached
    #                                         features; None: the preset's (tfssl.eval.linear.PRESETS)
    semi_fractions: List[float] = field(default_factory=lambda: [0.01, 0.1])
    semi_head_lr: float = 0.1               # fine-tuning: head lr; backbone lr = semi_backbone_ratio × head lr
    semi_backbone_ratio: float = 0.1
    semi_batch_size: int = 256
    semi_weight_decay: float = 5e-4
    pseudo_label: bool = False              # semi: add an entropy-filtered pseudo-label round (CsMl protocol)
    pseudo_entropy: float = 0.5             # keep unlabelled images whose prediction entropy (nats) is below this
    plot_limit: int = 2000                  # t-SNE / projector points (held-out images)
    baselines: List[str] = field(default_factory=list)   # protocols `tfssl pretrain` runs at its end on the trained
    #                                         backbone, a random-init one and raw pixels, printed side by side
    retrieval_queries: int = 8
    seed: int = 0


@dataclass
class ExportConfig:
    formats: List[str] = field(default_factory=lambda: ["savedmodel", "onnx", "keras"])
    input_size: Optional[int] = None


@dataclass
class DistributeConfig:
    strategy: str = "default"               # default | mirrored | multi_worker | tpu
    logical_cpus: int = 0                   # >1: split the CPU into N logical devices (testing MirroredStrategy)
    tpu: Optional[str] = None


CHOICES = {
    ("model", "backbone"): ["resnet18", "resnet34", "resnet50", "small", "tiny"],
    ("data", "on_corrupt"): ["skip", "error"],
    ("data", "originals"): [True, False, "auto"],
    ("augment", "preset"): ["fashion_mnist", "cifar", "stl10", "imagenet"],
    ("train", "optimizer"): ["sgd", "lars", "lamb"],
    ("train", "lr_scaling"): ["linear", "sqrt", "none"],
    ("train", "precision"): ["float32", "mixed_bfloat16", "mixed_float16", "auto"],
    ("train", "kernels"): ["auto", "stock", "tuned"],
    ("train", "on_nan"): ["stop", "skip"],
    ("train", "jit_compile"): [True, False, "auto"],
    ("train", "data_autotune"): [True, False, "auto"],
    ("distribute", "strategy"): ["default", "mirrored", "multi_worker", "tpu"],
    ("eval", "linear_preset"): ["small", "ressl", "ressl_small", "wcl", "moco", "csml", "simclr"],
}

# method.name → its parameter dataclass. tfssl.methods fills it (register_method) when it is imported, which
# `import tfssl` does; config never imports the methods (no import cycle).
METHOD_PARAMS: Dict[str, type] = {}


def register_method(name: str, params_cls) -> None:
    """Make ``method.name=name`` valid, its keys checked against the dataclass ``params_cls``."""
    METHOD_PARAMS[name] = params_cls


# keys that take one of these words or a positive integer
WORD_OR_COUNT = {("train", "views_parallelism"): ["auto", "autotune"]}
# list keys whose every entry must be one of these
LIST_CHOICES = {("train", "wd_exclude"): ["bn", "bias"], ("eval", "baselines"): ["knn", "linear", "semi"]}

SECTIONS = {"model": ModelConfig, "data": DataConfig, "augment": AugmentConfig, "train": TrainConfig,
            "eval": EvalConfig, "export": ExportConfig, "distribute": DistributeConfig}


@dataclass
class Config:
    method: Any = None                      # the chosen method's parameter dataclass (has a ``name`` field)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _suggest(key, valid):
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(where: str, value: Any, typ) -> Any:
    """Check ``value`` against the annotation ``typ``; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union:                      # Optional[X]
        if value is None:
            return None
        return _coerce(where, value, [a for a in args if a is not type(None)][0])
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):   # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ in (int, float, str) and (not isinstance(value, typ) or isinstance(value, bool) and typ is not bool):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(section: str, cls, values: Dict[str, Any], source: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{section}.{key}'{_suggest(key, names)}; "
                              f"valid keys of '{section}': {', '.join(names)}")
        value = _coerce(f"{source}: {section}.{key}", value, hints[key])
        choices = CHOICES.get((section, key))
        if choices and not any(type(value) is type(c) and value == c for c in choices):   # 1 is not true
            raise ConfigError(f"{source}: {section}.{key}={value!r} is not one of "
                              f"{', '.join(str(c).lower() if isinstance(c, bool) else c for c in choices)}")
        words = WORD_OR_COUNT.get((section, key))
        if words and value not in words and not (type(value) is int and value >= 1):
            raise ConfigError(f"{source}: {section}.{key}={value!r} is not {', '.join(words)} or a positive integer")
        allowed = LIST_CHOICES.get((section, key))
        if allowed and any(v not in allowed for v in value):
            raise ConfigError(f"{source}: {section}.{key}={value!r}: entries must be among {', '.join(allowed)}")
        kwargs[key] = value
    return cls(**kwargs)


def build_section(section: str, values: Dict[str, Any], source: str = "<config>"):
    """One validated section: ``model``, ``data``, … → its dataclass; ``method`` (with ``name``) → the method's
    parameter dataclass."""
    if section == "method":
        values = dict(values or {})
        name = values.pop("name", None)
        if name not in METHOD_PARAMS:
            raise ConfigError(f"{source}: method.name={name!r} is not one of {', '.join(sorted(METHOD_PARAMS))}")
        return _build("method", METHOD_PARAMS[name], values, source)
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section '{section}'; valid: method, {', '.join(SECTIONS)}")
    return _build(section, SECTIONS[section], values or {}, source)


def from_dict(raw: Dict[str, Any], source: str = "<config>") -> Config:
    """Validate a nested dict (a parsed recipe) into a :class:`Config`."""
    raw = dict(raw or {})
    valid = ["method"] + list(SECTIONS)
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{source}: unknown section '{key}'{_suggest(key, valid)}; valid: {', '.join(valid)}")
    params = build_section("method", raw.get("method"), source)
    return Config(method=params, **{s: _build(s, cls, raw.get(s) or {}, source) for s, cls in SECTIONS.items()})


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: Dict[str, Any], overrides: List[str], source: str = "--set") -> Dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars/lists) onto a raw recipe dict."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"{source} {item!r}: expected section.key=value, e.g. train.epochs=5")
        path, value = item.split("=", 1)
        section, key = path.split(".", 1)
        if raw.get(section) is None:      # absent, or an empty YAML section
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source} {item!r}: '{section}' is not a section")
        raw[section][key] = _parse_scalar(value)
    return raw


def resolve_path(name_or_path: str) -> str:
    """A recipe path, or a recipe name looked up in ./configs and in the configs/ beside the package."""
    candidates = [name_or_path]
    if not name_or_path.endswith((".yaml", ".yml")):
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        candidates += [os.path.join(d, name_or_path + ".yaml") for d in ("configs", os.path.join(here, "configs"))]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise ConfigError(f"config file not found: {name_or_path!r} (looked in: {', '.join(candidates)}); "
                      f"pass a YAML path or a recipe name from configs/, e.g. ressl_fashion_mnist")


def load(path: str, overrides: Optional[List[str]] = None) -> Config:
    """Read a YAML recipe (path or recipe name), apply overrides and validate."""
    path = resolve_path(path)
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    return from_dict(apply_overrides(raw, overrides or []), source=path)


def dump(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (temp file, then rename)."""
    d = cfg.to_dict()
    d["method"] = dict(name=type(cfg.method).method_name, **d["method"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    os.replace(tmp, path)
