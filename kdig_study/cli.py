"""Shared command-line plumbing: one-line errors, the common flags, the default scale."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from kdig_study.config import SCALES, StudyConfig, load_study
from kdig_study.errors import KdigError

# "kdig COMMAND" when the command was started through kdig (kdig_study.__main__ sets it)
invoked_as: str | None = None


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump); started as `kdig
    COMMAND`, its usage and errors name that form."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        if invoked_as:
            kwargs["prog"] = invoked_as
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_study_args(p: argparse.ArgumentParser, trains_students: bool = False,
                   device: bool = True, tracks: bool = False) -> None:
    """The shared arguments; ``trains_students``: also --no-teacher-cache; ``device=False``
    for a command that always runs on the CPU (export: it measures the deployed models);
    ``tracks``: also --track (the searches and ablations)."""
    p.add_argument("--study", required=True,
                   help="study name in studies/ (e.g. kd_ig) or a path to a .toml file")
    p.add_argument("--scale", default=None,
                   help=f"{' | '.join(SCALES)}; default: paper with a GPU, cpu without")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10 folder or archive (default: $KDIG_DATA, ./data, ../shared/data)")
    if device:
        p.add_argument("--device", default="auto",
                       help="auto (CUDA when present) | cpu | cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   dest="overrides",
                   help="override a study-file value, e.g. --set student_train.epochs=2 "
                        "(repeatable; checked like the file, recorded in the study's config)")
    if trains_students:
        p.add_argument("--no-teacher-cache", action="store_true",
                       help="run the teacher on every KD/AT step instead of reading its "
                            "outputs from the cache (teacher_cache.enabled = false)")
    if tracks:
        from kdig_study.tracking import TRACKERS

        p.add_argument("--track", default=None, metavar="|".join(TRACKERS),
                       help="also log every trial's per-epoch curves, parameters and metrics "
                            "to these trackers (comma list; MLflow at $MLFLOW_TRACKING_URI, "
                            "else sqlite:///storage/mlflow.db; TensorBoard under "
                            "storage/tensorboard); needs pip install -e \".[track]\"")


def default_scale() -> str:
    import torch

    return "paper" if torch.cuda.is_available() else "cpu"


def load_from_args(args: argparse.Namespace) -> StudyConfig:
    overrides = list(getattr(args, "overrides", []) or [])
    if getattr(args, "no_teacher_cache", False):
        overrides.append("teacher_cache.enabled=false")
    return load_study(args.study, args.scale or default_scale(), overrides)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


# Set in a worker's environment by spawn_workers: the pid of the process that started it.
_PARENT_ENV = "KDIG_PARENT_PID"


def _watch_parent() -> None:
    """In a worker: interrupt this process (the Ctrl-C path: its trial failed cleanly, the
    store consistent) once the parent that started it is gone, even by SIGKILL; workers
    used to run on to the end of their trials."""
    import threading
    import time

    parent = os.environ.pop(_PARENT_ENV, None)  # not inherited by what this one starts
    if parent is None:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by run(), even where SIGINT is ignored

    threading.Thread(target=watch, daemon=True, name="kdig-parent-watch").start()


def run(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI entry point: a KdigError becomes one line on stderr and exit status 2;
    Ctrl-C, SIGTERM and SIGHUP (a preempted machine, `scancel`, `docker stop`, a closed
    terminal) exit with 130 after the entry point's own cleanup ran."""
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    _watch_parent()
    try:
        code = main() or 0
    except KdigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:
        # a folder that cannot be written (read-only, full, missing permission): the file
        # and the reason in one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: cannot write or read {where}{e.strerror or e}; check the folder "
              f"(KDIG_STORAGE, KDIG_CACHE, KDIG_ARTIFACTS, --out)", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    sys.exit(code)


def _child_env(children: int) -> dict[str, str]:
    """The environment of one of ``children`` processes run at once: torch threads split so
    that children x threads <= cores, and this process's pid (a child stops when it dies)."""
    from kdig_study.measure import default_threads

    threads = str(max(1, default_threads() // children))
    return os.environ.copy() | {"OMP_NUM_THREADS": threads, "KDIG_THREADS": threads,
                                _PARENT_ENV: str(os.getpid())}


def _stop(procs: Iterable[subprocess.Popen[Any]]) -> None:
    """After Ctrl-C or SIGTERM here: SIGTERM to the children still running (a terminal's
    Ctrl-C reached them too, a background start ignores SIGINT; SIGTERM is their own clean
    stop), then wait for each."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait()


def run_children(cmds: list[tuple[str, list[str]]], parallel: int,
                 on_exit: Callable[[str, int], None] = lambda label, code: None
                 ) -> dict[str, int]:
    """Commands (label, argv), ``parallel`` at a time (:func:`_child_env`); each line they
    print comes out prefixed "[label] ". ``on_exit(label, status)`` runs as each one ends
    (e.g. to save its results while the others go on). Returns each label's exit status;
    after a failure no further command starts. Ctrl-C and SIGTERM stop those running."""
    import threading
    import time

    env = _child_env(parallel)

    def relay(label: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[{label}] {line}", end="", flush=True)

    queue, codes = list(cmds), {}
    running: dict[str, tuple[subprocess.Popen[str], threading.Thread]] = {}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                label, argv = queue.pop(0)
                proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
                relay_thread = threading.Thread(target=relay, args=(label, proc), daemon=True)
                relay_thread.start()
                running[label] = (proc, relay_thread)
            time.sleep(0.2)
            for label, (proc, relay_thread) in list(running.items()):
                if proc.poll() is not None:
                    relay_thread.join()
                    codes[label] = proc.returncode
                    del running[label]
                    on_exit(label, proc.returncode)
                    if proc.returncode != 0:
                        queue.clear()
    except KeyboardInterrupt:
        _stop(proc for proc, _ in running.values())
        for _, relay_thread in running.values():
            relay_thread.join()
        raise
    return codes


def spawn_workers(module: str, argv: list[str], n: int) -> None:
    """N copies of a command (``python -m module argv --worker-index i --no-progress``) that
    share one study through its store; torch threads split so workers x threads <= cores.
    CUDA devices are dealt round-robin (worker i on device i mod GPUs): with one GPU every
    worker shares it, which pays when one small model leaves the GPU idle (the device check
    measures img/s at 1, 2, 4 and 8 workers). Ctrl-C reaches every worker."""
    import torch

    gpus = torch.cuda.device_count()
    procs = []
    for i in range(n):
        env = _child_env(n)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv,
                                       "--worker-index", str(i), "--no-progress"], env=env))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        _stop(procs)
        raise
    failed = [c for c in codes if c != 0]
    if failed:
        raise KdigError(f"{len(failed)} of {n} workers failed (exit codes {failed}); "
                        f"run the same command again to finish")
