"""Mid-run checkpoints: everything a training run needs to go on from the end of an epoch
and end with exactly the weights and metrics it would have had uninterrupted.

A checkpoint holds the weights, the optimizer, the scheduler, the lookahead average, every
generator the run draws from (the loader's order, crops and flips; the overlay's), torch's
global RNG, the best-so-far weights and the history. It is named by the run's key (a hash of
everything its result depends on), so whichever process runs the same run next (a retried
trial, the same ablation run taken over by another worker, the teacher trained again) finds
it; a run is deterministic given its key, so any checkpoint under that key at epoch k is the
state of that run at epoch k. Written atomically with fsync of the file and its folder, read
with ``torch.load(weights_only=True)`` (no pickled code runs), removed when the run ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdig_study.config import CheckpointConfig
from kdig_study.paths import atomic_write, cache_dir

FORMAT = 1  # bumped when the stored fields change; another format is not resumed


def checkpoint_path(key: str) -> Path:
    """Where the run with this key keeps its checkpoint (shared like every cache)."""
    return cache_dir() / "checkpoints" / f"{key[:32]}.pt"


@dataclass(frozen=True)
class Resume:
    """A run's checkpointing: its key and file, and how often it writes.

    ``every_epochs``: at the end of every N-th epoch; ``every_s`` > 0 instead: at the end of
    the first epoch after that many seconds since the last write (long epochs on a GPU cost
    a write each; short ones on a CPU need not)."""

    key: str
    every_epochs: int = 1
    every_s: float = 0.0
    log: Callable[..., Any] = print

    @property
    def path(self) -> Path:
        return checkpoint_path(self.key)

    def due(self, epoch: int, last_write: float) -> bool:
        if self.every_s > 0:
            return time.monotonic() - last_write >= self.every_s
        return epoch % self.every_epochs == 0

    def save(self, state: dict[str, Any]) -> None:
        atomic_write(self.path, lambda tmp: torch.save(
            {"format": FORMAT, "key": self.key, **state}, tmp), durable=True)

    def load(self) -> dict[str, Any] | None:
        """The stored state of this run, or None (none, another run's, or unreadable: said
        in one line, and the run starts from epoch 1)."""
        path = self.path
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: zip, pickle or tensor errors alike
            self.log(f"checkpoint {path} is unreadable ({type(e).__name__}); starting from "
                     f"epoch 1")
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT or \
                state.get("key") != self.key:
            self.log(f"checkpoint {path} is of another run or format; starting from epoch 1")
            return None
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def run_resume(cfg: CheckpointConfig, parts: list[Any], log: Callable[..., Any] = print
               ) -> Resume | None:
    """The checkpointing of the run that ``parts`` identify (everything its result depends
    on, JSON-serialisable; torch's version is added), or None where checkpoints are off."""
    if not cfg.enabled:
        return None
    key = hashlib.sha256(json.dumps([*parts, torch.__version__], sort_keys=True,
                                    default=str).encode()).hexdigest()
    return Resume(key, cfg.every_epochs, cfg.every_minutes * 60.0, log)


@contextlib.contextmanager
def until_ended(resume: Resume | None) -> Iterator[None]:
    """Around a run: its checkpoint is removed when the run ends, finished, pruned or failed;
    an interrupt (KeyboardInterrupt: Ctrl-C, SIGTERM, SIGHUP) keeps it for the next sitting."""
    try:
        yield
    except Exception:
        if resume is not None:
            resume.remove()
        raise
    if resume is not None:
        resume.remove()
