"""The teacher's outputs on a run's training stream, computed once, read by later runs.

Every trial of a search and every KD condition of one ablation replicate trains on the same
stream: the same images in the same order with the same crops and flips (the loader draws
them from the run seed alone; the overlay has a generator of its own, and the teacher sees
the clean image). The teacher, in eval mode, maps that stream to the same logits (and, for
attention transfer, the same attention maps) every time. The first run of a stream writes
them as it trains, one file per epoch; later runs read them instead of running the teacher.
Reading is exact: the bits a run reads are the bits it would have computed (same teacher,
stream, precision, device kind and torch build: all in the key).

Layout: ``<cache>/teacher_outputs/<key[:20]>/``
    stream.json                what the key is made of (for people)
    epoch_0001.safetensors     order [N] int64 (the stream's image rows, a check on the key),
                               logits [N, classes] fp32, attention [N, h*w] fp32 (AT only);
                               the SHA-256 of the three in the file's metadata
Each file is written atomically (temporary file, then rename) when its epoch's batches are
done: a run stopped or pruned at epoch k leaves epochs 1..k, which a longer run reads and
then extends. Workers sharing the cache may write the same epoch at once; the contents are
the same bits and the rename is atomic, so no reader sees a partial file. One epoch is held
in memory at a time (cpu scale: 10,000 x 10 floats, 0.4 MB; with AT maps of 16 x 16, 10 MB).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kdig_study.errors import KdigError
from kdig_study.paths import atomic_write, cache_dir, write_json

FORMAT = 1


@dataclass(frozen=True)
class TeacherOut:
    logits: torch.Tensor  # [B, classes], fp32
    attention: torch.Tensor | None  # [B, h*w], fp32, L2-normalised (AT only)


def device_kind(device: torch.device) -> str:
    """What decides the teacher's bits besides its inputs: the kernels torch picks."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}:{torch.version.cuda}"
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), "")
    except OSError:
        pass
    return f"cpu:{name or platform.processor()}:{torch.backends.cpu.get_cpu_capability()}"


def stream_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class TeacherStream:
    """One stream's cache folder and this run's use of it.

    ``fields``: everything the stream and the teacher's outputs depend on (teacher and data
    fingerprints, the rows trained on, seed, batch size, augmentation, precision, device
    kind, torch version, the AT tap). Not the epoch count: epoch e of a stream is the same
    whatever the run's length, so a longer run extends a shorter run's files.
    ``max_bytes``: the stream is not kept when its epochs would need more (checked on the
    first batch, when the outputs' size is known); the run then computes every step.
    """

    fields: dict[str, Any]
    epochs: int
    max_bytes: float
    log: Callable[[str], None] = print
    root: Path = field(init=False)
    served: int = 0  # steps whose outputs were read (the rest of the run's steps ran it)
    keep: bool = True

    def __post_init__(self) -> None:
        self.root = cache_dir() / "teacher_outputs" / stream_key(self.fields)[:20]

    def epoch_path(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch:04d}.safetensors"

    def cached_epochs(self) -> int:
        """How many leading epochs of this stream are on disk (not checked here)."""
        e = 0
        while self.epoch_path(e + 1).is_file():
            e += 1
        return e

    def open_epoch(self, epoch: int, images: int) -> EpochOutputs:
        """Epoch ``epoch`` of ``images`` images: stored, or to be computed (and recorded)."""
        return EpochOutputs(self, epoch, self._read(epoch) if self.keep else None, images)

    def _read(self, epoch: int) -> dict[str, torch.Tensor] | None:
        path = self.epoch_path(epoch)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error types for a bad file
            self.log(f"teacher-output cache {path} is unreadable ({str(e)[:80]}); the teacher "
                     f"runs for this epoch and the file is written again")
            return None
        if meta.get("sha256") != _digest(tensors):
            self.log(f"teacher-output cache {path} fails its checksum; the teacher runs for "
                     f"this epoch and the file is written again")
            return None
        return tensors

    def _write(self, epoch: int, tensors: dict[str, torch.Tensor]) -> None:
        if not self.root.is_dir():
            write_json(self.root / "stream.json", self.fields | {"format": FORMAT})
        meta = {"sha256": _digest(tensors), "format": str(FORMAT)}
        atomic_write(self.epoch_path(epoch),
                     lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def check_size(self, per_image: int, images_per_epoch: int) -> None:
        """Decide, from the first batch's output size, whether this stream is kept."""
        need = 4.0 * (per_image + 2) * images_per_epoch * self.epochs
        if need > self.max_bytes:
            self.keep = False
            self.log(f"teacher-output cache: not kept for this run (its {self.epochs} epochs "
                     f"need {need / 2**20:,.0f} MB > teacher_cache.max_mb = "
                     f"{self.max_bytes / 2**20:,.0f}); the teacher runs every step")


class EpochOutputs:
    """One epoch of a stream: serves stored outputs batch by batch, or computes and records
    them and writes the epoch's file when ``finish`` is called after its last batch."""

    def __init__(self, stream: TeacherStream, epoch: int,
                 stored: dict[str, torch.Tensor] | None, images: int) -> None:
        self.stream, self.epoch, self.stored, self.images = stream, epoch, stored, images
        self.pos = 0
        self.parts: list[tuple[torch.Tensor, TeacherOut]] = []

    def get(self, idx: torch.Tensor, compute: Callable[[], TeacherOut],
            device: torch.device) -> TeacherOut:
        """The teacher's outputs for the batch of stream rows ``idx`` ([B]): read, or
        ``compute()``d and recorded."""
        if self.stored is not None:
            b = idx.numel()
            order = self.stored["order"][self.pos:self.pos + b]
            if not torch.equal(order, idx.cpu()):
                raise KdigError(f"teacher-output cache {self.stream.root}: epoch {self.epoch} "
                                f"holds other images than this run's stream (a key that "
                                f"misses a setting); delete the folder, or run with "
                                f"--no-teacher-cache")
            att = self.stored.get("attention")
            out = TeacherOut(self.stored["logits"][self.pos:self.pos + b].to(device),
                             None if att is None else att[self.pos:self.pos + b].to(device))
            self.pos += b
            self.stream.served += 1
            return out
        out = compute()
        if self.stream.keep and not self.parts:  # the first batch tells the outputs' size
            per_image = out.logits.shape[1] + (0 if out.attention is None
                                               else out.attention.shape[1])
            self.stream.check_size(per_image, self.images)
        if self.stream.keep:
            self.parts.append((idx.cpu(), out))
        return out

    def finish(self) -> None:
        """After the epoch's last batch: write what was computed (if the stream is kept)."""
        if self.stored is not None or not self.parts or not self.stream.keep:
            return
        tensors = {"order": torch.cat([i for i, _ in self.parts]).to(torch.int64),
                   "logits": torch.cat([o.logits.detach().float().cpu() for _, o in self.parts])}
        maps = [o.attention for _, o in self.parts if o.attention is not None]
        if maps:
            tensors["attention"] = torch.cat([m.detach().float().cpu() for m in maps])
        self.parts = []
        try:
            self.stream._write(self.epoch, tensors)
        except KdigError as e:  # a read-only or full cache: the run goes on without it
            self.stream.keep = False
            self.stream.log(f"teacher-output cache not written ({e}); the teacher runs every "
                            f"step of this run")
