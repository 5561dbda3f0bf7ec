"""Multi-worker training: 2 local worker processes × 1 replica (MultiWorkerMirroredStrategy, started by
``tfssl.launch.launch_local``) train exactly the step of 1 process × 2 replicas (MirroredStrategy on the two logical
CPUs) and of 1 process × 1 device, for every method case of test_methods and the same global batch of 8: loss, logs,
every weight (student, teacher incl. BatchNorm statistics, probe) and the queues, to float32 tolerance.

The cluster is started once: the workers (tests/multiworker_worker.py) loop over all cases, building each model fresh
from the initial weights this test writes first, so the three setups start from identical weights and batches
(tests/helpers.py's crafted views). The references are the 1-device and 2-replica steps of test_methods, computed
once per test process (helpers.one_step_cases, same xdist group). The launcher's own behaviour (TF_CONFIG, output
prefixes, failure and timeout handling) is tested with tiny Python workers first.
"""
import json
import os
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers
from conftest import h5_weights
from helpers import RICHEST, case_id, one_step_cases, weights_of
from tfssl import config
from tfssl.launch import TIMEOUT_EXIT, free_ports, launch_local, tf_config, worker_argv

TIMEOUT = 600           # seconds for the whole worker cluster (all cases: ~3–5 min on 2 busy cores); then killed
ATOL, RTOL = 1e-5, 1e-4  # test_methods' one-step tolerances


def _diff(a, b, atol=ATOL, rtol=RTOL):
    """(max |a − b|, within atol + rtol·|b| everywhere)."""
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    if a.shape != b.shape:
        return float("inf"), False
    d = np.abs(a - b)
    return float(d.max(initial=0.0)), bool(np.all(d <= atol + rtol * np.abs(b)))


def _compare(label, got, want, names, problems, rows, atol=ATOL, rtol=RTOL):
    """Compare two result dicts (see ``worker.results``); record failures in ``problems``, maxima in ``rows``."""
    worst = {}
    for key in sorted(set(want) | set(got)):
        if key not in got or key not in want:
            problems.append(f"{label}: {key} missing on one side")
            continue
        if key == "log_z_std":       # a per-replica statistic (std over the local rows), legitimately different
            continue
        kind = "weights" if key.startswith("w") and key[1:].isdigit() else key
        if key.endswith("_ptr") or key == "iterations":
            ok, d = np.array_equal(got[key], want[key]), float(np.max(np.abs(got[key] - want[key])))
        else:
            d, ok = _diff(got[key], want[key], atol, rtol)
        worst[kind] = max(worst.get(kind, 0.0), d)
        if not ok:
            what = names[int(key[1:])] if kind == "weights" else key
            problems.append(f"{label}: {what} differs by up to {d:.2e}")
    rows.append(f"{label}: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))


def _python(code):
    return [sys.executable, "-c", code]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_tf_config_free_ports_and_worker_argv():
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(0 < p < 65536 for p in ports)
    cfg = json.loads(tf_config(ports, 2))
    assert cfg == {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": 2}}
    with pytest.raises(ValueError):
        tf_config(ports, 3)
    argv = worker_argv(["pretrain", "ressl_fashion_mnist", "--set", "distribute.strategy=mirrored"])
    assert argv[-4:] == ["--set", "distribute.strategy=multi_worker", "--set", "distribute.logical_cpus=0"]
    assert config.load("ressl_fashion_mnist", [a for a in argv[2:] if a != "--set"]).distribute.strategy == "multi_worker"
    assert worker_argv(["eval", "knn", "--workdir", "w"]) == ["eval", "knn", "--workdir", "w"]


def test_launch_local_gives_each_worker_its_tf_config_and_prefixes_its_output():
    lines, addresses = [], set()
    code = ("import json, os, sys; c = json.loads(os.environ['TF_CONFIG']); i = c['task']['index']; "
            "print(i, c['task']['type'], len(c['cluster']['worker']), c['cluster']['worker'][i]); "
            "print('to stderr', file=sys.stderr)")
    assert launch_local([], workers=3, timeout=120, log=lines.append, command=_python(code)) == 0
    for i in range(3):
        mine = [line for line in lines if line.startswith(f"[worker {i}] ")]
        assert len(mine) == 2 and f"[worker {i}] to stderr" in mine, lines
        index, kind, n, address = [line for line in mine if "stderr" not in line][0].split()[2:]
        assert (index, kind, n) == (str(i), "worker", "3") and address.startswith("127.0.0.1:")
        addresses.add(address)
    assert len(addresses) == 3   # every worker listens on its own port


def test_launch_local_stops_the_others_when_a_worker_fails(tmp_path):
    # worker 1 fails at once; worker 0 would wait forever (like a peer blocked in a collective)
    code = ("import json, os, sys, time; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
            f"open(os.path.join({str(tmp_path)!r}, f'pid{{i}}'), 'w').write(str(os.getpid())); "
            "time.sleep(0.5); sys.exit(3) if i == 1 else time.sleep(600)")
    lines, start = [], time.monotonic()
    assert launch_local([], workers=2, timeout=300, log=lines.append, command=_python(code)) == 3
    assert time.monotonic() - start < 60 and any("worker 1 failed with exit code 3" in line for line in lines)
    assert not _alive(int((tmp_path / "pid0").read_text()))


def test_launch_local_timeout_kills_workers_that_ignore_sigterm(tmp_path):
    code = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w').close(); time.sleep(600)")
    lines, start = [], time.monotonic()
    assert launch_local([], workers=2, timeout=2, grace=1, log=lines.append, command=_python(code)) == TIMEOUT_EXIT
    assert time.monotonic() - start < 60 and any("timeout" in line for line in lines)
    pids = [int(p.name) for p in tmp_path.iterdir()]
    assert pids and not any(_alive(p) for p in pids)


@pytest.mark.slow
@pytest.mark.xdist_group("replicas")
def test_two_workers_equal_two_replicas_and_one_device(tmp_path, mirrored):
    # one case per method, its richest variant (multi-crop, symmetric, KNN crops, stage-3 level): every gather,
    # queue and synchronized-BN path crosses the worker boundary; the other variants differ only within a process
    assert sorted({name for name, _ in RICHEST}) == sorted({name for name, _ in helpers.CASES})
    problems, rows = run_cases(RICHEST, tmp_path, mirrored)
    assert not problems, "\n".join(problems + ["", "max differences:"] + rows)


def run_cases(method_cases, tmp_path, mirrored):
    """Train ``method_cases`` (helpers.CASES entries) one step on 2 workers and compare with the 1-device and
    2-replica steps; (problems, summary rows)."""
    start = time.perf_counter()
    steps = [one_step_cases(name, params, mirrored) for name, params in method_cases]   # cached per process
    cases = []
    for name, params in method_cases:
        step = one_step_cases(name, params, mirrored)
        case = {"id": case_id(name, params), "num_views": len(step.views)}
        config.dump(step.cfg, str(tmp_path / f"{case['id']}.yaml"))
        np.savez(tmp_path / f"{case['id']}_init.npz", labels=step.labels,
                 **{f"view{i}": v for i, v in enumerate(step.views)},
                 **{f"w{i:04d}": w for i, w in enumerate(step.init)})
        cases.append(case)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiworker_worker.py")
    env = {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    lines = []
    code = launch_local([script, str(tmp_path)], workers=2, timeout=TIMEOUT, env=env, log=lines.append,
                        command=[sys.executable])
    log = "\n".join(lines[-80:])
    assert code == 0, f"the workers failed (exit code {code}):\n{log}"

    problems, rows = [], []
    for case, step in zip(cases, steps):
        with np.load(tmp_path / f"{case['id']}_worker0.npz") as f:
            chief = dict(f)
        with np.load(tmp_path / f"{case['id']}_worker1.npz") as f:
            other = dict(f)
        label = case["id"]
        assert np.isfinite(chief["log_loss"]) and int(chief["iterations"]) == 1, label
        moved = max(np.abs(a - b).max() for a, b in zip(weights_of(chief), step.init))
        assert moved > 1e-3, f"{label}: the step did not change the weights"
        _compare(f"{label} 2 workers vs 1 device", chief, step.results1, step.names, problems, rows)
        _compare(f"{label} 2 workers vs 2 replicas", chief, step.results2, step.names, problems, rows)
        # the workers' mirrored variables are in sync: all-reduced updates are bit-identical on every worker
        _compare(f"{label} worker 1 vs worker 0", other, chief, step.names, problems, rows, atol=0.0, rtol=0.0)
    rows.append(f"{len(cases)} cases in {time.perf_counter() - start:.0f} s; workers: "
                + "; ".join(line for line in lines if "done in" in line))
    print("\n".join(rows))
    return problems, rows


@pytest.mark.slow
def test_launch_local_pretrain_equals_two_replicas_in_one_process(tmp_path, capsys):
    """``tfssl launch-local --workers 2`` runs the real pretraining job (model.fit under MultiWorkerMirroredStrategy,
    the epoch pipeline split over the workers, backups, kNN) and ends with the very weights of the same recipe on
    MirroredStrategy over 2 logical CPUs; only the chief writes the run directory."""
    from tfssl import cli
    sets = ["data.limit=128", "data.test_limit=128", "train.epochs=1", "train.batch_size=64", "train.verbose=0",
            "model.backbone=tiny", "model.projector_hidden=32", "eval.knn_train_limit=256", "method.queue_size=256",
            "train.deterministic=true", "train.jit_compile=false",
            "eval.baselines=[]"]    # the closing baselines table: tested in test_train; here ~10 s on 2 busy cores
    flags = sum((["--set", s] for s in sets), [])
    workers = tmp_path / "workers"
    assert cli.main(["launch-local", "ressl_fashion_mnist", "--workers", "2", "--workdir", str(workers),
                     "--timeout", str(TIMEOUT)] + flags) == 0
    out = capsys.readouterr().out
    assert "[worker 0]" in out and "[worker 1]" in out and "2 replica(s) [MultiWorkerMirroredStrategy]" in out
    assert cli.main(["pretrain", "ressl_fashion_mnist", "--workdir", str(tmp_path / "mirrored")] + flags +
                    ["--set", "distribute.strategy=mirrored"]) == 0
    a = h5_weights(workers / "checkpoints" / "last.weights.h5")
    b = h5_weights(tmp_path / "mirrored" / "checkpoints" / "last.weights.h5")
    assert a.keys() == b.keys() and len(a) > 50
    for name in a:      # same collectives, same reduction order: equal to float32 rounding
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
    summary = json.load(open(workers / "summary.json"))
    assert summary["strategy"] == "MultiWorkerMirroredStrategy" and summary["replicas"] == 2
    assert len(summary["history"]["loss"]) == 1 and np.isfinite(summary["final_loss"])
    assert sorted(os.listdir(workers / "backup")) == ["epoch-0001"]   # written once, by the chief


def test_launch_local_cli_rejects_a_bad_recipe_before_starting_workers(tmp_path, capsys):
    from tfssl import cli
    assert cli.main(["launch-local", "--workers", "2", "--workdir", str(tmp_path / "w"), "--set", "train.epoch=1"]) == 2
    err = capsys.readouterr()
    assert "unknown key 'train.epoch'" in err.err and "launching" not in err.out
    assert cli.main(["launch-local", "--workers", "0", "--workdir", str(tmp_path / "w")]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
