"""tfssl.devices: the one decision point for device-specific choices — the plan for each (simulated) device kind,
explicit settings, AVX2 emulation, and that stock and tuned kernels compute the same step while exports stay stock."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import devices
from tfssl.backbones import ChunkedGradConv2D, FusedBatchNormalization, build_backbone
from tfssl.devices import Device, cap_flags, plan
from tfssl.export import plain_backbone

AVX2 = frozenset("fpu sse4_1 sse4_2 avx fma avx2".split())
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
KINDS = {"avx2": Device("cpu", AVX2), "generic": Device("cpu", frozenset("fpu sse4_1 sse4_2 avx".split())), "avx512": Device("cpu", AVX512), "bf16": Device("cpu", AVX512_BF16),
         "amx": Device("cpu", AVX512 | {"amx_bf16", "amx_tile"}), "v100": Device("gpu", compute_capability=(7, 0)),
         "a100": Device("gpu", compute_capability=(8, 0)), "k80": Device("gpu", compute_capability=(3, 7)),
         "tpu": Device("tpu")}
# device → (jit, conv, chunk MB, batch norm, precision) under jit/kernels/precision = auto
EXPECTED = {"avx2": (False, "chunked", 8, "xla_forward", "float32"),
            "generic": (False, "chunked", 8, "fused_v3", "float32"),
            "avx512": (False, "chunked", 8, "fused_v3", "float32"),
            "bf16": (False, "chunked", 8, "fused_v3", "mixed_bfloat16"),
            "amx": (False, "chunked", 8, "fused_v3", "mixed_bfloat16"),
            "v100": (True, "stock", None, "stock", "mixed_float16"),
            "a100": (True, "stock", None, "stock", "mixed_bfloat16"),
            "k80": (True, "stock", None, "stock", "float32"),
            "tpu": (True, "stock", None, "stock", "mixed_bfloat16")}


@pytest.mark.parametrize("kind", list(KINDS))
def test_auto_plan_for_each_device_kind(kind):
    p = plan(KINDS[kind], "auto", "auto", "auto")
    jit, conv, chunk, bn, precision = EXPECTED[kind]
    assert (p.jit, p.conv, p.batch_norm, p.precision) == (jit, conv, bn, precision)
    assert p.conv_chunk_bytes == (chunk << 20 if chunk else None)
    assert all(why.startswith("auto: ") for why in p.reasons.values()), p.reasons
    line = p.describe()                                  # the train step's log line names every choice
    assert ("XLA (" if jit else "TF graph, no XLA") in line and bn in line and precision in line


def test_explicit_settings_win_and_kernels_follow_the_compile_mode():
    for device in KINDS.values():
        for jit in (True, False):
            p = plan(device, jit, "tuned", "float32")
            assert p.jit is jit and p.reasons["jit"] == "train.jit_compile" and p.precision == "float32"
            graph_bn = devices.CPU_GRAPH_BN[device.cpu_kind][0] if device.kind == "cpu" else "fused_v3"
            assert (p.conv, p.conv_chunk_bytes, p.batch_norm) == \
                ("chunked", (2 if jit else 8) << 20, "closed_form" if jit else graph_bn)
            stock = plan(device, jit, "stock", "mixed_bfloat16")
            assert (stock.conv, stock.conv_chunk_bytes, stock.batch_norm) == ("stock", None, "stock")
            assert {k: stock.reasons[k] for k in ("jit", "kernels", "precision")} == \
                {"jit": "train.jit_compile", "kernels": "train.kernels=stock", "precision": "train.precision"}
    with pytest.raises(ValueError, match="train.kernels"):
        plan(KINDS["avx2"], "auto", "fast", "float32")


def test_multi_worker_on_a_cpu_runs_without_xla():
    p = plan(KINDS["avx2"], True, "auto", "float32", multi_worker=True)
    assert not p.jit and "no collectives" in p.reasons["jit"] and p.batch_norm == "xla_forward"   # the graph's
    assert plan(KINDS["a100"], True, "auto", "float32", multi_worker=True).jit


def test_deterministic_ops_rule_out_xla_as_keras_does():
    """Keras's compile() drops XLA while TensorFlow's deterministic ops are on: the plan says so instead of
    printing an XLA step that never runs, and an explicit jit_compile=true is one clear error."""
    for kind in ("avx2", "tpu"):
        p = plan(KINDS[kind], "auto", "auto", "float32", deterministic=True)
        assert not p.jit and "train.deterministic" in p.reasons["jit"] and p.batch_norm != "closed_form"
    with pytest.raises(ValueError, match="train.deterministic=true and train.jit_compile=true"):
        plan(KINDS["avx2"], True, "auto", "float32", deterministic=True)


def test_avx2_emulation_caps_the_flags():
    assert cap_flags(AVX512_BF16, "AVX2") == AVX2
    assert cap_flags(AVX512_BF16, "avx512_core") == AVX512
    assert cap_flags(AVX512_BF16, None) == AVX512_BF16 and cap_flags(AVX512_BF16, "nonsense") == AVX512_BF16
    assert Device("cpu", cap_flags(AVX512_BF16, "AVX2")).cpu_kind == "avx2"
    emulated = devices.detect(environ={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert emulated.kind == "cpu" and not any(f.startswith("avx512") for f in emulated.flags)
    if "avx512f" in devices.cpu_flags():
        assert emulated.emulated == "AVX2" and "emulated" in emulated.describe()


def test_detect_reads_this_cpu_and_finds_accelerators(monkeypatch):
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    here = devices.detect(environ={})
    assert here.kind == "cpu" and here.flags == flags and here.emulated is None
    real = tf.config.list_logical_devices
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: ["/TPU:0"] if kind == "TPU" else real(kind))
    assert devices.detect().kind == "tpu"
    monkeypatch.setattr(tf.config, "list_logical_devices", real)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["gpu0"] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda d: {"compute_capability": (8, 6)})
    gpu = devices.detect()
    assert gpu.kind == "gpu" and gpu.compute_capability == (8, 6) and gpu.describe() == "GPU sm_86"


def _step(model, x, upstream, jit):
    @tf.function(jit_compile=jit)
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x, training=True) * upstream)
        return [loss] + tape.gradient(loss, [x] + model.trainable_variables)
    return [t.numpy() for t in run(x)]


@pytest.mark.parametrize("jit", [False, True])
def test_stock_and_tuned_kernels_give_the_same_step(jit):
    keras.utils.set_random_seed(0)
    tuned = build_backbone("tiny", width=2.0)
    stock = build_backbone("tiny", width=2.0)
    stock.set_weights(tuned.get_weights())
    devices.apply_kernels(tuned, plan(KINDS["avx2"], jit, "tuned", "float32"))
    devices.apply_kernels(stock, plan(KINDS["avx2"], jit, "stock", "float32"))
    for layer in stock.layers:
        if isinstance(layer, ChunkedGradConv2D):
            assert layer.chunk_bytes is None
        if isinstance(layer, FusedBatchNormalization):
            assert layer.kernel == "stock"
    # small chunks, so that the tuned kernel gradient really is a sum over several batch chunks (the plan's 2 or
    # 8 MB would hold this whole batch: 16 × 16×16×16 floats is 256 KB in the first stage)
    for layer in tuned.layers:
        if isinstance(layer, ChunkedGradConv2D):
            layer.chunk_bytes = 32 << 10
    rng = np.random.default_rng(1)
    x = tf.constant(rng.uniform(0, 1, (16, 16, 16, 3)), tf.float32)
    upstream = tf.constant(rng.standard_normal((16, tuned.outputs[0].shape[-1])), tf.float32)
    for a, b in zip(_step(tuned, x, upstream, jit), _step(stock, x, upstream, jit)):   # forward, every gradient
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, np.abs(b).max()), rtol=1e-5)
    for a, b in zip(tuned.non_trainable_weights, stock.non_trainable_weights):   # BatchNorm moving statistics
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=1e-5)


def test_an_exported_backbone_holds_stock_layers_whatever_the_plan():
    model = build_backbone("tiny")
    for kernels in ("tuned", "stock"):
        devices.apply_kernels(model, plan(KINDS["avx2"], True, kernels, "float32"))
        plain = plain_backbone(model)
        assert {type(l) for l in plain.layers if isinstance(l, keras.layers.Conv2D)} == {keras.layers.Conv2D}
        assert {type(l) for l in plain.layers if isinstance(l, keras.layers.BatchNormalization)} == \
            {keras.layers.BatchNormalization}


@pytest.mark.parametrize("flags,kind,precision", [
    ("fpu sse4_2 avx fma avx2", "avx2", "float32"),                      # AMD EPYC (Zen 2/3), Intel Haswell+
    ("fpu avx2 fma avx512f avx512bw avx512vl", "avx512", "float32"),      # Skylake-SP, Ice Lake
    ("fpu avx2 fma avx512f avx512_bf16 avx512_vnni", "avx512_bf16", "mixed_bfloat16"),   # Zen 4/5, Cooper Lake
    ("fpu avx2 fma avx512f amx_bf16 amx_tile", "avx512_bf16", "mixed_bfloat16"),          # Sapphire Rapids
    ("fpu sse4_2 avx", "generic", "float32")])
def test_a_cpuinfo_file_gives_its_kinds_row_of_choices(tmp_path, flags, kind, precision):
    """The per-kind decision from a fake /proc/cpuinfo: kind, then the CPU_CHOICES row (graph on every kind
    measured, bf16 where the CPU has bf16 arithmetic), with the row's reason in the log line."""
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    device = Device("cpu", devices.cpu_flags(str(info)))
    assert device.cpu_kind == kind
    p = plan(device, "auto", "auto", "auto")
    jit, row_precision, why = devices.CPU_CHOICES[kind]
    assert (p.jit, p.precision) == (jit, precision) == (False, row_precision)
    assert p.reasons["jit"] == f"auto: {why}" and why in p.describe()
    bn, why_bn = devices.CPU_GRAPH_BN[kind]                         # the graph's tuned kernels: the kind's row
    assert (p.conv, p.batch_norm) == ("chunked", bn) and why_bn in p.reasons["kernels"]
    assert bn == ("xla_forward" if kind == "avx2" else "fused_v3")   # measured faster on AVX2 only (NOTES §7m)
    assert plan(device, True, "auto", "auto").batch_norm == "closed_form"   # an explicit XLA step: its kernels
    calls, why_views = devices.CPU_VIEWS[kind]                       # the input pipeline's views: the kind's row
    assert p.views_parallelism == calls and p.reasons["views"] == f"auto: {why_views}"
    assert f"views {calls or 'AUTOTUNE'} in flight" in p.describe()
    tune, why_tune = devices.CPU_AUTOTUNE[kind]                      # tf.data's autotuner: the kind's row
    assert p.data_autotune is tune and p.reasons["autotune"] == f"auto: {why_tune}"
    assert f"tf.data autotuner {'on' if tune else 'off'} (auto: {why_tune})" in p.describe()


@pytest.mark.parametrize("kind", list(KINDS))
def test_views_parallelism_auto_per_kind_and_explicit_settings(kind):
    """``train.views_parallelism``: auto takes the CPU kind's row (accelerators keep tf.data's AUTOTUNE), a number
    or ``autotune`` wins on every device, anything else is one error naming the key."""
    device = KINDS[kind]
    auto = plan(device, "auto", "auto", "auto").views_parallelism
    assert auto == (devices.CPU_VIEWS[device.cpu_kind][0] if device.kind == "cpu" else None)
    assert plan(device, "auto", "auto", "auto", views=3).views_parallelism == 3
    explicit = plan(device, "auto", "auto", "auto", views="autotune")
    assert explicit.views_parallelism is None and explicit.reasons["views"] == "train.views_parallelism"
    for bad in (0, -1, 1.5, True, "fast"):
        with pytest.raises(ValueError, match="train.views_parallelism"):
            plan(device, "auto", "auto", "auto", views=bad)


@pytest.mark.parametrize("kind", list(KINDS))
def test_data_autotune_auto_per_kind_and_explicit_settings(kind):
    """``train.data_autotune``: auto takes the CPU kind's row (off where measured: bench/NOTES.md §7k), accelerator
    hosts keep tf.data's autotuner; true/false win on every device; anything else is one error naming the key."""
    device = KINDS[kind]
    auto = plan(device, "auto", "auto", "auto")
    assert auto.data_autotune is (devices.CPU_AUTOTUNE[device.cpu_kind][0] if device.kind == "cpu" else True)
    assert device.kind == "cpu" or auto.reasons["autotune"] == f"auto: {device.kind.upper()} host, tf.data's default"
    for setting in (True, False):
        explicit = plan(device, "auto", "auto", "auto", autotune=setting)
        assert explicit.data_autotune is setting and explicit.reasons["autotune"] == "train.data_autotune"
    for bad in (1, 0, "off", None):
        with pytest.raises(ValueError, match="train.data_autotune"):
            plan(device, "auto", "auto", "auto", autotune=bad)


def test_the_autotune_choice_sets_the_pipeline_option_and_keeps_the_batches():
    """:func:`tfssl.pipeline.with_autotune` sets tf.data's autotuner on a whole pipeline; the batches are the same."""
    from tfssl import pipeline
    ds = tf.data.Dataset.range(64).map(lambda i: tf.cast(i, tf.float32) * 2.0, tf.data.AUTOTUNE,
                                       deterministic=True).batch(8).prefetch(tf.data.AUTOTUNE)
    on, off = pipeline.with_autotune(ds, True), pipeline.with_autotune(ds, False)
    assert on.options().autotune.enabled is True and off.options().autotune.enabled is False
    for a, b in zip(on.as_numpy_iterator(), off.as_numpy_iterator()):
        np.testing.assert_array_equal(a, b)


def test_pretraining_runs_the_plans_autotune_choice(tmp_path, monkeypatch):
    """``pretrain`` hands ``model.fit`` the pipeline with the plan's autotuner choice and records it (log line,
    summary.json)."""
    from tfssl import config, pipeline
    from tfssl.train import pretrain
    seen = []
    real = pipeline.with_autotune
    monkeypatch.setattr(pipeline, "with_autotune", lambda ds, on: seen.append(real(ds, on)) or seen[-1])
    cfg = config.load("ressl_fashion_mnist", ["data.limit=128", "data.test_limit=64", "train.epochs=1",
                                              "train.batch_size=64", "train.verbose=0", "model.backbone=tiny",
                                              "model.projector_hidden=32", "method.queue_size=128",
                                              "eval.knn_train_limit=128", "train.data_autotune=false"])
    lines = []
    summary = pretrain(cfg, str(tmp_path), log=lines.append)
    assert [ds.options().autotune.enabled for ds in seen] == [False]
    assert summary["train_plan"]["data_autotune"] is False
    assert "tf.data autotuner off (train.data_autotune)" in next(x for x in lines if x.startswith("train step:"))


def test_the_views_parallelism_reaches_every_pretraining_pipeline():
    """The plan's number is the views map's ``num_parallel_calls`` (None: AUTOTUNE) in the epoch and pair
    pipelines and in the base method's hook; the batches are the same whatever it is (a deterministic map)."""
    from tfssl import config, data, pipeline
    from tfssl.cutmix import cutmix
    from tfssl.methods.base import SSLMethod

    def views(images, **_):
        x = tf.cast(images, tf.float32)
        return x + 1.0, x * 2.0

    def calls(ds):                            # the views map sits under the final prefetch
        return int(ds._input_dataset._num_parallel_calls)
    x = np.random.default_rng(0).integers(0, 255, (40, 8, 8, 1), dtype=np.uint8)
    source = data.from_numpy(x, np.arange(40) % 4, cfg=config.DataConfig(name="numpy", image_size=8))
    table = tf.Variable(np.tile(np.arange(40, dtype=np.int32)[:, None], (1, 2)))
    cfg = config.load("ressl_fashion_mnist", ["data.seed=3"])
    makers = {"epoch": lambda p: pipeline.epoch_pipeline(source, 4, 3, None, views, seed=3, views_parallelism=p),
              "pair": lambda p: pipeline.pair_pipeline(source, table, views, 4, cutmix, seed=3, views_parallelism=p),
              "hook": lambda p: SSLMethod.make_pipeline(None, source, views, cfg, 3, None, views_parallelism=p)}
    for name, make in makers.items():
        assert (calls(make(1)), calls(make(2)), calls(make(None))) == (1, 2, tf.data.AUTOTUNE), name
        one, auto = (list(make(p).take(3).as_numpy_iterator()) for p in (1, None))
        for a, b in zip(one, auto):
            for u, v in zip(a["views"], b["views"]):
                np.testing.assert_array_equal(u, v)
