"""tfssl.config: YAML recipes → typed Config, ``--set`` overrides, errors that name the key and the fix, recipe lookup
by name and a dump that loads back to the same Config."""
import os

import pytest
import yaml

from tfssl import config as C
from tfssl.config import ConfigError

RECIPE = {
    "method": {"name": "ressl", "queue_size": 128, "teacher_temperature": 0.05, "crop_sizes": [16, 24]},
    "model": {"backbone": "tiny", "projector_hidden": 64, "projector_dim": 32},
    "data": {"name": "fashion_mnist", "limit": 1000, "image_size": 32},
    "augment": {"preset": "fashion_mnist", "size": 32, "small_scale": [0.1, 0.3]},
    "train": {"epochs": 2, "batch_size": 64, "lr": 1, "optimizer": "lars"},
    "distribute": {"strategy": "mirrored", "logical_cpus": 2},
}


def _write(path, raw):
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


@pytest.fixture
def recipe_file(tmp_path):
    return _write(tmp_path / "recipe.yaml", RECIPE)


# ---------------------------------------------------------------------------------------------------- happy paths

def test_from_dict_fills_defaults_and_typed_sections():
    cfg = C.from_dict({"method": {"name": "simclr"}})
    assert type(cfg.method).method_name == "simclr"
    assert cfg.method.temperature == 0.5
    assert isinstance(cfg.model, C.ModelConfig) and cfg.model.backbone == "resnet18"
    assert isinstance(cfg.train, C.TrainConfig) and cfg.train.epochs == 10 and cfg.train.steps_per_epoch is None
    assert cfg.data.name == "fashion_mnist" and cfg.data.limit is None
    assert cfg.distribute.strategy == "default"
    assert cfg.export.formats == ["savedmodel", "onnx", "keras"]


def test_load_yaml_file(recipe_file):
    cfg = C.load(recipe_file)
    assert type(cfg.method).method_name == "ressl"
    assert cfg.method.queue_size == 128
    assert cfg.method.teacher_temperature == 0.05
    assert cfg.method.crop_sizes == [16, 24]
    assert cfg.model.backbone == "tiny" and cfg.model.projector_dim == 32
    assert cfg.data.limit == 1000
    assert cfg.augment.small_scale == [0.1, 0.3]
    assert cfg.train.epochs == 2 and cfg.train.batch_size == 64 and cfg.train.optimizer == "lars"
    # an int is accepted for a float field and becomes a float
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.distribute.strategy == "mirrored" and cfg.distribute.logical_cpus == 2
    # untouched keys keep their defaults
    assert cfg.train.momentum == 0.9 and cfg.eval.knn_k == 200


def test_load_empty_sections_use_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method:\n  name: mocov2\nmodel:\ntrain:\n")
    cfg = C.load(str(path))
    assert cfg.model == C.ModelConfig() and cfg.train == C.TrainConfig()


OVERRIDES = [
    ("data.limit=100", ("data", "limit"), 100),
    ("data.limit=null", ("data", "limit"), None),
    ("train.epochs=3", ("train", "epochs"), 3),
    ("train.steps_per_epoch=7", ("train", "steps_per_epoch"), 7),
    ("train.steps_per_epoch=null", ("train", "steps_per_epoch"), None),
    ("train.batch_size=512", ("train", "batch_size"), 512),
    ("model.backbone=resnet50", ("model", "backbone"), "resnet50"),
    ("distribute.strategy=tpu", ("distribute", "strategy"), "tpu"),
    ("train.lr=0.5", ("train", "lr"), 0.5),
    ("augment.on_device=true", ("augment", "on_device"), True),
    ("augment.small_scale=[0.05, 0.2]", ("augment", "small_scale"), [0.05, 0.2]),
    ("method.queue_size=256", ("method", "queue_size"), 256),
    ("method.crop_sizes=[8, 12, 16]", ("method", "crop_sizes"), [8, 12, 16]),
]


@pytest.mark.parametrize("item,where,expected", OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_override_via_apply_overrides(item, where, expected):
    raw = C.apply_overrides(RECIPE, [item])
    cfg = C.from_dict(raw)
    assert getattr(getattr(cfg, where[0]), where[1]) == expected


@pytest.mark.parametrize("item,where,expected", OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_override_via_load(recipe_file, item, where, expected):
    cfg = C.load(recipe_file, overrides=[item])
    assert getattr(getattr(cfg, where[0]), where[1]) == expected


def test_several_overrides_last_wins_and_input_not_mutated(recipe_file):
    before = yaml.safe_load(open(recipe_file))
    raw = C.apply_overrides(before, ["train.epochs=5", "train.epochs=6", "eval.knn_k=7", "data.name=folder"])
    assert before == RECIPE                              # the parsed recipe is left alone
    cfg = C.from_dict(raw)
    assert cfg.train.epochs == 6 and cfg.eval.knn_k == 7 and cfg.data.name == "folder"
    assert cfg.train.batch_size == 64                    # other keys of the same section survive
    cfg2 = C.load(recipe_file, overrides=["train.epochs=5", "model.backbone=resnet34"])
    assert cfg2.train.epochs == 5 and cfg2.model.backbone == "resnet34" and cfg2.model.projector_dim == 32


def test_override_can_switch_method():
    cfg = C.from_dict(C.apply_overrides({"method": {"name": "ressl"}}, ["method.name=simclr"]))
    assert type(cfg.method).method_name == "simclr"


def test_override_into_empty_yaml_section(tmp_path):
    """A recipe with an empty section (``train:`` with every key commented out parses as None) loads fine without
    overrides, so ``--set train.epochs=3`` must also work on it."""
    path = tmp_path / "r.yaml"
    path.write_text("method:\n  name: ressl\ntrain:\n  # epochs: 100\n")
    assert C.load(str(path)).train.epochs == 10
    cfg = C.load(str(path), overrides=["train.epochs=3"])
    assert cfg.train.epochs == 3


def test_float_in_exponent_notation(tmp_path):
    """``lr: 1e-3`` / ``--set train.weight_decay=5e-4`` is how float hyper-parameters are written; PyYAML (YAML 1.1)
    reads them as strings, and the config must still accept them as floats."""
    path = tmp_path / "r.yaml"
    path.write_text("method:\n  name: simclr\ntrain:\n  lr: 1e-3\n")
    cfg = C.load(str(path), overrides=["train.weight_decay=5e-4"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(5e-4) and isinstance(cfg.train.weight_decay, float)


# ---------------------------------------------------------------------------------------------------- errors

def _err(fn, *args, **kw):
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    return str(e.value)


def test_unknown_key_names_key_lists_valid_keys_and_suggests():
    msg = _err(C.from_dict, {"method": {"name": "ressl"}, "train": {"epoch": 3}})
    assert "train.epoch" in msg
    assert "did you mean 'epochs'" in msg
    for valid in ("epochs", "batch_size", "steps_per_epoch", "optimizer", "lr"):
        assert valid in msg


def test_unknown_key_via_override(recipe_file):
    msg = _err(C.load, recipe_file, overrides=["data.limt=5"])
    assert "data.limt" in msg and "did you mean 'limit'" in msg and "image_size" in msg


def test_unknown_method_param_suggests():
    msg = _err(C.from_dict, {"method": {"name": "simclr", "temprature": 0.2}})
    assert "method.temprature" in msg and "did you mean 'temperature'" in msg


def test_unknown_key_without_close_match_has_no_suggestion():
    msg = _err(C.from_dict, {"method": {"name": "ressl"}, "model": {"zzzzqqq": 1}})
    assert "model.zzzzqqq" in msg and "did you mean" not in msg and "backbone" in msg


def test_unknown_section():
    msg = _err(C.from_dict, {"method": {"name": "ressl"}, "trian": {"epochs": 1}})
    assert "unknown section 'trian'" in msg and "did you mean 'train'" in msg
    for s in ("method", "model", "data", "augment", "train", "eval", "export", "distribute"):
        assert s in msg
    msg = _err(lambda: C.from_dict(C.apply_overrides({"method": {"name": "ressl"}}, ["optim.lr=0.1"])))
    assert "unknown section 'optim'" in msg


@pytest.mark.parametrize("item,key,expected", [
    ("train.epochs=abc", "train.epochs", "int"),
    ("train.epochs=true", "train.epochs", "int"),         # a bool is not an int
    ("train.epochs=1.5", "train.epochs", "int"),
    ("train.batch_size=[1, 2]", "train.batch_size", "int"),
    ("data.limit=many", "data.limit", "int"),
    ("train.lr=fast", "train.lr", "float"),
    ("train.lr=false", "train.lr", "float"),
    ("data.download=1", "data.download", "true or false"),
    ("model.backbone=5", "model.backbone", "str"),
    ("augment.small_scale=0.1", "augment.small_scale", "list"),
    ("method.crop_sizes=[16, big]", "method.crop_sizes[1]", "int"),
])
def test_wrong_type(recipe_file, item, key, expected):
    msg = _err(C.load, recipe_file, overrides=[item])
    assert key in msg and expected in msg


def test_wrong_type_in_yaml(tmp_path):
    path = _write(tmp_path / "r.yaml", {"method": {"name": "ressl"}, "train": {"epochs": "abc"}})
    msg = _err(C.load, path)
    assert "train.epochs" in msg and "expected int" in msg and path in msg
    msg = _err(C.from_dict, {"method": {"name": "ressl"}, "train": {"epochs": True}})
    assert "train.epochs" in msg


def test_section_must_be_mapping():
    msg = _err(C.from_dict, {"method": {"name": "ressl"}, "train": [1, 2]})
    assert "'train'" in msg and "mapping" in msg


@pytest.mark.parametrize("item,valid", [
    ("distribute.strategy=foo", ["default", "mirrored", "multi_worker", "tpu"]),
    ("model.backbone=resnet101", ["resnet18", "resnet34", "resnet50", "tiny"]),
    ("train.optimizer=adam", ["sgd", "lars", "lamb"]),
    ("augment.preset=mnist", ["fashion_mnist", "cifar", "stl10", "imagenet"]),
    ("data.on_corrupt=ignore", ["skip", "error"]),
    ("train.jit_compile=xla", ["true", "false", "auto"]),
    ("train.jit_compile=1", ["true", "false", "auto"]),          # 1 == True in Python, but not a bool
    ("train.data_autotune=fast", ["true", "false", "auto"]),
])
def test_bad_choice_names_valid_choices(recipe_file, item, valid):
    msg = _err(C.load, recipe_file, overrides=[item])
    key, bad = item.split("=")
    assert key in msg and bad in msg
    for v in valid:
        assert v in msg


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_jit_compile_and_data_autotune_take_a_bool_or_auto(recipe_file, value, expected):
    for key in ("jit_compile", "data_autotune"):
        assert getattr(C.from_dict({"method": {"name": "ressl"}}).train, key) == "auto"        # the default
        assert getattr(C.load(recipe_file, overrides=[f"train.{key}={value}"]).train, key) == expected


def test_unknown_method_name():
    msg = _err(C.from_dict, {"method": {"name": "byol"}})
    assert "byol" in msg and "method.name" in msg
    for m in ("mocov2", "ressl", "simclr"):
        assert m in msg
    msg = _err(C.from_dict, {"train": {"epochs": 1}})       # no method at all
    assert "method.name" in msg and "ressl" in msg


def test_missing_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "nope.yaml")
    msg = _err(C.load, missing)
    assert "not found" in msg and "nope.yaml" in msg
    msg = _err(C.load, "no_such_recipe")
    assert "not found" in msg and "no_such_recipe" in msg and os.path.join("configs", "no_such_recipe.yaml") in msg


@pytest.mark.parametrize("item", ["train.epochs", "epochs=5", "=5", "train.epochs 5"])
def test_malformed_override(item):
    msg = _err(C.apply_overrides, {"method": {"name": "ressl"}}, [item])
    assert repr(item) in msg and "section.key=value" in msg


def test_malformed_override_via_load(recipe_file):
    msg = _err(C.load, recipe_file, overrides=["train.epochs"])
    assert "section.key=value" in msg


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1, 2\n")
    msg = _err(C.load, str(bad))
    assert "not valid YAML" in msg and "bad.yaml" in msg
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    assert "mapping" in _err(C.load, str(lst))


# ---------------------------------------------------------------------------------------------------- lookup / dump

def test_resolve_path_finds_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    _write(tmp_path / "configs" / "x.yaml", {"method": {"name": "mocov2", "queue_size": 64}})
    found = C.resolve_path("x")
    assert os.path.samefile(found, tmp_path / "configs" / "x.yaml")
    # a path is returned as it is
    assert C.resolve_path(str(tmp_path / "configs" / "x.yaml")) == str(tmp_path / "configs" / "x.yaml")
    cfg = C.load("x", overrides=["train.epochs=1"])
    assert type(cfg.method).method_name == "mocov2" and cfg.method.queue_size == 64 and cfg.train.epochs == 1
    # a name that exists nowhere is an error, not a silent default
    with pytest.raises(ConfigError):
        C.resolve_path("y")


@pytest.mark.parametrize("raw", [
    RECIPE,
    {"method": {"name": "simclr", "temperature": 0.3}, "train": {"steps_per_epoch": 5, "warmup_epochs": 0.5},
     "export": {"formats": ["keras"], "input_size": 28}},
    {"method": {"name": "mocov2", "symmetric": True, "momentum_schedule": "cosine"},
     "data": {"path": "/tmp/x", "test_limit": 10, "seed": None}, "augment": {"small_crops": 2},
     "distribute": {"tpu": "local"}, "eval": {"knn_train_limit": 100}},
], ids=["ressl", "simclr", "mocov2"])
def test_dump_roundtrip(tmp_path, raw):
    cfg = C.from_dict(raw)
    out = str(tmp_path / "resolved.yaml")
    C.dump(cfg, out)
    assert not os.path.exists(out + ".tmp")
    dumped = yaml.safe_load(open(out))
    assert dumped["method"]["name"] == type(cfg.method).method_name
    assert set(dumped) == {"method", "model", "data", "augment", "train", "eval", "export", "distribute"}
    back = C.load(out)
    assert back == cfg
    assert type(back.method) is type(cfg.method)
    # the dumped recipe is itself a valid recipe: dumping it again gives the same text
    out2 = str(tmp_path / "again.yaml")
    C.dump(back, out2)
    assert open(out2).read() == open(out).read()


def test_views_parallelism_takes_auto_autotune_or_a_positive_count():
    for good in ("auto", "autotune", 1, 4):
        assert C.load("ressl_fashion_mnist", [f"train.views_parallelism={good}"]).train.views_parallelism == good
    for bad in ("fast", 0, -2, 1.5, "true"):
        with pytest.raises(ConfigError, match="train.views_parallelism=.* is not auto, autotune or a positive"):
            C.load("ressl_fashion_mnist", [f"train.views_parallelism={bad}"])
