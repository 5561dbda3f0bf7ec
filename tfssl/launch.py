"""Start a multi-worker job on this machine: N worker processes, one ``TF_CONFIG`` each, 127.0.0.1 as the cluster.

``tf.distribute.MultiWorkerMirroredStrategy`` (``distribute.strategy=multi_worker``) learns its cluster from the
``TF_CONFIG`` environment variable, a JSON document read once when the strategy is created::

    {"cluster": {"worker": ["host0:port0", "host1:port1", ...]},
     "task": {"type": "worker", "index": i}}

Every worker receives the same ``cluster`` (the ``host:port`` list, in the same order) and its own ``index``.
The strategy must be created at the start of the program, before any other TensorFlow op, with ``TF_CONFIG``
already set: it starts a gRPC server on the worker's own entry of the list, waits for all the others, and from then
on the workers exchange gradients, gathered tensors and synchronized-BatchNorm statistics with collective ops over
those connections (on CPU: ring all-reduce / all-gather over gRPC; here over localhost). Global replica ids are
worker-major, so worker ``w`` holds replica ``w`` when every worker has one device. There is no ``chief`` task in
the cluster, so worker 0 is the chief: the one that writes checkpoints and summaries
(``tfssl.distribute.is_chief``); the others compute the same steps on their share of every global batch.

On a real cluster nothing here is needed: start ``tfssl pretrain RECIPE --set distribute.strategy=multi_worker``
once per machine, each with ``TF_CONFIG`` naming the real ``host:port`` list (identical everywhere) and that
machine's own index. Cluster launchers do this for you: Kubeflow's TFJob writes ``TF_CONFIG`` into every pod; a
Slurm job script derives it from ``SLURM_PROCID`` and the node list (``SLURM_JOB_NODELIST``) before starting the
program. :func:`launch_local` does the same on one machine, which is how multi-worker training is tested and
debugged before a cluster is involved.

On CPU a worker is **one replica**: worker processes must not split the CPU into logical devices
(``distribute.logical_cpus``), so :func:`launch_local` forces ``distribute.logical_cpus=0`` on a ``pretrain``. Two
workers × one replica then train exactly the step of one process with two replicas (MirroredStrategy) or one
device, for the same global batch (``tests/test_multiworker.py``; note that Keras 3.15's ``model.fit`` itself does
not run under MultiWorkerMirroredStrategy, keras-team/keras#20585, so that test drives ``train_step`` directly).

API::

    launch_local(["pretrain", "ressl_fashion_mnist", "--set", "train.epochs=1"], workers=2, timeout=3600)
    launch_local(["worker.py", "arg"], workers=2, command=[sys.executable])   # any program, TF_CONFIG set
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

HOST = "127.0.0.1"
TIMEOUT_EXIT = 124      # returned when ``timeout`` passes (the code of coreutils ``timeout``)
SIGNAL_EXIT = 128       # a worker killed by signal s is reported as 128 + s (shell convention)


def free_ports(n: int, host: str = HOST) -> List[int]:
    """``n`` distinct TCP ports that are free on ``host`` right now.

    The ports come from the OS (binding port 0); all ``n`` sockets are held open together so the ports differ, then
    closed so the workers can bind them. Small race: between this call and a worker binding its port, another
    process may take the port; the worker then fails to start its server and :func:`launch_local` reports the
    failure (run again). On a real cluster, ports are fixed by the cluster's configuration instead.
    """
    if n < 1:
        raise ValueError(f"free_ports needs n >= 1, got {n}")
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: Sequence[int], index: int, host: str = HOST) -> str:
    """The ``TF_CONFIG`` JSON of worker ``index`` in a cluster of ``len(ports)`` workers on ``host``.

    ``cluster.worker`` lists every worker's ``host:port`` (identical for all workers); ``task`` is this process's
    entry. Worker 0 is the chief. On a cluster, use the machines' real addresses instead of one ``host``.
    """
    if not 0 <= index < len(ports):
        raise ValueError(f"worker index {index} is outside the cluster of {len(ports)} workers")
    return json.dumps({"cluster": {"worker": [f"{host}:{int(p)}" for p in ports]},
                       "task": {"type": "worker", "index": int(index)}})


def worker_argv(argv: Sequence[str]) -> List[str]:
    """The ``tfssl`` arguments of a worker for the user's ``argv``.

    A ``pretrain`` gets ``--set distribute.strategy=multi_worker --set distribute.logical_cpus=0`` appended (the
    last ``--set`` wins, so this overrides the recipe). Every worker gets the same ``--workdir``: only the chief
    writes there, the others write into scratch directories (``tfssl.train.pretrain``, ``distribute.is_chief``).
    Other commands are passed through unchanged.
    """
    argv = list(argv)
    if argv[:1] == ["pretrain"]:
        argv += ["--set", "distribute.strategy=multi_worker", "--set", "distribute.logical_cpus=0"]
    return argv


def _pump(stream, prefix: str, log: Callable[[str], None], lock: threading.Lock) -> None:
    """Forward a worker's output to ``log`` line by line with its prefix."""
    for line in iter(stream.readline, ""):
        with lock:
            log(prefix + line.rstrip("\n"))
    stream.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the worker's process group (the worker and anything it started)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM every running worker, then SIGKILL those still alive after ``grace`` seconds; reap them all."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:   # unkillable (should not happen); leave it to the OS
            pass


def _exit_code(code: int) -> int:
    return SIGNAL_EXIT - code if code < 0 else code


def launch_local(argv: Sequence[str], workers: int = 2, timeout: Optional[float] = None,
                 env: Optional[Dict[str, str]] = None, log: Callable[[str], None] = print,
                 command: Optional[Sequence[str]] = None, host: str = HOST, grace: float = 10.0) -> int:
    """Run ``workers`` local worker processes of one multi-worker job and wait for all of them.

    Worker ``i`` runs ``python -m tfssl <argv>`` (see :func:`worker_argv`: a ``pretrain`` is switched to
    ``distribute.strategy=multi_worker``), or ``command + argv`` unchanged when ``command`` is given (e.g.
    ``[sys.executable, "script.py"]``), with ``TF_CONFIG`` = :func:`tf_config` ``(ports, i)`` for a cluster of
    ``workers`` processes on ``host`` with free ports (:func:`free_ports`). Worker 0 is the chief.

    ``env``: variables added to (overriding) this process's environment for every worker. Each line a worker prints
    (stdout and stderr) is passed to ``log`` as ``"[worker i] line"``.

    Returns 0 when every worker exits with 0. When a worker fails, the others are stopped (SIGTERM, then SIGKILL
    after ``grace`` seconds; a surviving worker would otherwise wait forever in a collective) and its exit code is
    returned (128 + signal for a signalled worker). When ``timeout`` seconds pass first, all workers are stopped and
    124 is returned. An interrupt (Ctrl-C) stops the workers too.
    """
    if workers < 1:
        raise ValueError(f"launch_local needs workers >= 1, got {workers}")
    ports = free_ports(workers, host)
    base_env = dict(os.environ, **(env or {}))
    base_env["PYTHONUNBUFFERED"] = "1"   # worker lines arrive as they are printed
    log(f"launching {workers} local worker(s) on {', '.join(f'{host}:{p}' for p in ports)} (worker 0 is the chief)")

    lock = threading.Lock()
    procs: List[subprocess.Popen] = []
    pumps: List[threading.Thread] = []
    start = time.monotonic()
    try:
        for i in range(workers):
            if command is None:
                args = [sys.executable, "-m", "tfssl"] + worker_argv(argv)
            else:
                args = list(command) + list(argv)
            proc = subprocess.Popen(args, env=dict(base_env, TF_CONFIG=tf_config(ports, i, host)),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, errors="replace", start_new_session=True)
            procs.append(proc)
            pump = threading.Thread(target=_pump, args=(proc.stdout, f"[worker {i}] ", log, lock), daemon=True)
            pump.start()
            pumps.append(pump)

        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                _stop(procs, grace)
                with lock:
                    log(f"worker {i} failed with exit code {code}; stopped the other worker(s)")
                return _exit_code(code) or 1
            if all(c == 0 for c in codes):
                return 0
            if timeout is not None and time.monotonic() - start > timeout:
                _stop(procs, grace)
                with lock:
                    log(f"timeout: the workers did not finish within {timeout:g} s; stopped them")
                return TIMEOUT_EXIT
            time.sleep(0.1)
    finally:
        _stop(procs, grace)               # no-op when all exited; on an exception/interrupt, no orphans are left
        for pump in pumps:
            pump.join(5.0)
