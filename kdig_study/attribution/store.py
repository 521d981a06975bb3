"""The on-disk map store: one float16 [N, H, W] array per IG step count (or one per image
for a source without a step count), keyed by everything that decides its contents, written
chunk by chunk (resumable), under a lock (concurrent workers compute it once), checksummed
when finished and checked when opened.

:func:`build_store` fills a store with the teacher's IG maps (fixed rules through
:mod:`kdig_study.attribution.numerics`, adaptive ones through
:mod:`kdig_study.attribution.adaptive`); :func:`write_store` is the generic writer the other
map sources (:mod:`kdig_study.attribution.sources`) use with their own chunk functions.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kdig_study.attribution.adaptive import adaptive_ig
from kdig_study.attribution.numerics import (
    integrated_gradients,
    make_baseline,
    reduce_channels,
    relative_gap,
    union_rule,
)
from kdig_study.config import IGConfig
from kdig_study.data import normalize_uint8
from kdig_study.engine import autocast
from kdig_study.errors import KdigError
from kdig_study.models import Net, fold_batchnorm
from kdig_study.paths import cache_dir, file_sha256, locked, write_json

_STORE_VERSION = 2  # 2: map sources


@dataclass(frozen=True)
class MapSpec:
    """Everything that decides a store's contents."""

    teacher: str  # teacher fingerprint
    data: str  # data bundle fingerprint
    images: str  # hash of the source indices of the images (which images, in which order)
    n_images: int
    method: str  # IG rule (also for sources derived from IG maps); "" for the others
    baseline: str
    reduce: str
    counts: tuple[int, ...]  # IG step counts; (0,) for a source with one map per image
    precision: str  # resolved: fp32 or bf16 (autocast around the attribution)
    source: str = "ig"  # config.MAP_SOURCES
    options: str = ""  # the source's own settings (JSON), e.g. its seed, samples, parent store

    def key(self) -> str:
        blob = json.dumps([_STORE_VERSION, asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def index_hash(index: torch.Tensor) -> str:
    return hashlib.sha256(index.to(torch.int64).numpy().tobytes()).hexdigest()


class MapStore:
    """A finished store: one float16 [N, 32, 32] array per step count, read by memory map.

    Row i of every array is the map of training image i (the images' source indices are
    stored alongside, in ``index.npy``).
    """

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root, self.meta = root, meta

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(self.meta["spec"]["counts"])

    @property
    def source(self) -> str:
        return str(self.meta["spec"].get("source", "ig"))

    def variant(self, steps: int) -> int:
        """The array that serves ``steps``: itself, or 0 for a one-map source (Captum's
        methods have no step count)."""
        return 0 if self.counts == (0,) else steps

    def maps(self, steps: int) -> np.ndarray:
        steps = self.variant(steps)
        if steps not in self.counts:
            raise KdigError(f"IG map store {self.root} holds steps {list(self.counts)}, "
                            f"not {steps}")
        return np.load(self.root / f"maps_s{steps}.npy", mmap_mode="r")

    def planes(self, steps: int) -> torch.Tensor:
        """[N, 1, H, W] float16 tensor (a copy in memory), for the loader."""
        return torch.from_numpy(np.array(self.maps(steps))).unsqueeze(1)

    def index(self) -> np.ndarray:
        return np.load(self.root / "index.npy")

    def gap(self, steps: int) -> dict[str, float]:
        """Completeness gap statistics (nan for sources without a completeness property)."""
        return self.meta["gap"][str(self.variant(steps))]


def gap_summary(store: MapStore) -> str:
    """One line: the median completeness gap per step count (or, adaptive, the points)."""
    spec = store.meta["spec"]
    if spec["method"].startswith("adaptive-"):
        m = store.meta.get("measured", {})
        g = store.gap(0)
        return (f"{spec['method']} to a gap of {json.loads(spec['options'])['target_gap']:.2%}: "
                f"median gap {g['median']:.3%}, p90 {g['p90']:.3%}; "
                f"{m.get('points_mean', float('nan')):.1f} points per image on average "
                f"(median {m.get('points_median', float('nan')):.0f}), {spec['precision']}")
    gaps = ", ".join(f"{s} steps {store.gap(s)['median']:.2%}" for s in store.counts)
    return f"median completeness gap {gaps} ({spec['method']} rule, {spec['precision']})"


def store_root(spec: MapSpec) -> Path:
    return cache_dir() / "ig" / spec.key()


def _verify(root: Path) -> tuple[dict[str, Any] | None, str]:
    """(meta, "") for a complete, intact store; (None, why) otherwise."""
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        return None, "not finished"
    try:
        meta = json.loads(meta_path.read_text())
        checksums, sizes = dict(meta["checksums"]), dict(meta["sizes"])
        meta["spec"]["counts"], meta["gap"]  # noqa: B018 - the keys a reader needs
    except (ValueError, KeyError, TypeError):
        return None, "meta.json unreadable or incomplete"
    for name, digest in checksums.items():
        f = root / name
        if not f.is_file():
            return None, f"{name} missing"
        if f.stat().st_size != sizes.get(name):
            return None, f"{name} truncated ({f.stat().st_size} of {sizes.get(name)} bytes)"
        if file_sha256(f) != digest:
            return None, f"{name} corrupted (checksum mismatch)"
    return meta, ""


def open_store(spec: MapSpec) -> MapStore | None:
    meta, _ = _verify(store_root(spec))
    return MapStore(store_root(spec), meta) if meta is not None else None


@dataclass
class BuildReport:
    store: MapStore
    computed_images: int  # 0 when the store was already there
    seconds: float
    note: str  # e.g. why an old store was recomputed


# (start, stop) -> maps [C, stop - start, H, W] (one per count), gaps [C, stop - start], and
# per-image extras {name: [stop - start]} (e.g. the points an adaptive image used)
ChunkFn = Callable[[int, int], tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]


def build_store(spec: MapSpec, teacher: Net, images: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor, mean: Sequence[float], std: Sequence[float], cfg: IGConfig,
                device: torch.device, progress: bool = True, log: Any = print) -> BuildReport:
    """The IG store for ``spec``: opened, or computed (see :func:`write_store`).

    images: [N, 3, H, W] uint8, un-augmented, in training-row order; labels [N]; index [N]
    their source indices.
    """
    def chunks() -> ChunkFn:
        mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
        folded = fold_batchnorm(teacher).to(device).to(memory_format=torch.channels_last)

        def chunk(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, dict]:
            x = normalize_uint8(images[start:stop], mean_t, std_t, device).contiguous(
                memory_format=torch.channels_last)
            base = make_baseline(spec.baseline, x, mean_t, std_t)
            with autocast(spec.precision, device):
                if adaptive:
                    a = adaptive_ig(folded, x, labels[start:stop], base, cfg.adaptive_rule,
                                    cfg.adaptive_start, cfg.adaptive_cap, cfg.target_gap,
                                    cfg.internal_batch)
                    return (reduce_channels(a.attributions, spec.reduce)[None].cpu().numpy(),
                            a.gap[None].cpu().numpy(),
                            {"points": a.points.cpu().numpy()})
                res = integrated_gradients(folded, x, labels[start:stop], base, alphas,
                                           weights, cfg.internal_batch)
            return (reduce_channels(res.attributions, spec.reduce).cpu().numpy(),
                    relative_gap(res.attributions, res.delta).cpu().numpy(), {})
        return chunk

    adaptive = spec.method.startswith("adaptive-")
    if adaptive:
        desc = (f"IG maps, adaptive {cfg.adaptive_rule} to a gap of {cfg.target_gap:.2%} "
                f"({cfg.adaptive_start + 1}..{cfg.adaptive_cap + 1} points/image)")
    else:
        alphas, weights = union_rule(spec.method, spec.counts)
        desc = f"IG maps ({alphas.numel()} points/image)"
    return write_store(spec, index, tuple(images.shape[-2:]), chunks, cfg.batch_size, desc,
                       progress, log, extras=("points",) if adaptive else ())


def write_store(spec: MapSpec, index: torch.Tensor, size: tuple[int, int],
                make_chunks: Callable[[], ChunkFn], batch: int, desc: str,
                progress: bool = True, log: Any = print,
                measured: dict[str, Any] | None = None, extras: tuple[str, ...] = ()
                ) -> BuildReport:
    """Open the store for ``spec``, or compute it with the chunk function that
    ``make_chunks()`` returns (called only when there is work): resumable chunk by chunk,
    locked so that concurrent workers compute it once, checksummed when finished.
    ``measured``: filled while computing, kept in the store's meta.json."""
    root = store_root(spec)
    t0 = time.perf_counter()
    with locked(root):
        meta, why = _verify(root)
        if meta is not None:
            return BuildReport(MapStore(root, meta), 0, time.perf_counter() - t0, "")
        note = ""
        if why != "not finished":
            note = f"map store {root} was damaged ({why}); recomputing it"
            log(note)
            shutil.rmtree(root)
        computed = _compute(spec, root, index, size, make_chunks, batch, desc, progress,
                            measured if measured is not None else {}, extras, log)
        meta, why = _verify(root)
        if meta is None:  # pragma: no cover - a failure of the disk under us
            raise KdigError(f"map store {root} failed its own check after writing: {why}")
        return BuildReport(MapStore(root, meta), computed, time.perf_counter() - t0, note)


def _compute(spec: MapSpec, root: Path, index: torch.Tensor, size: tuple[int, int],
             make_chunks: Callable[[], ChunkFn], batch: int, desc: str, progress: bool,
             measured: dict[str, Any], extras: tuple[str, ...],
             log: Callable[..., Any] = print) -> int:
    n, (h, w) = spec.n_images, size
    root.mkdir(parents=True, exist_ok=True)
    files = {c: root / f"maps_s{c}.npy" for c in spec.counts}
    gap_file = root / "gaps.npy"
    extra_files = {name: root / f"{name}.npy" for name in extras}
    progress_file = root / "progress.json"
    shapes: dict[Path, tuple[tuple[int, ...], str]] = \
        {f: ((n, h, w), "float16") for f in files.values()} | \
        {gap_file: ((len(spec.counts), n), "float32")} | \
        {f: ((n,), "int32") for f in extra_files.values()}
    done, crc, why = _resumable_state(progress_file, shapes)
    if why is None:
        arrays = {c: np.load(f, mmap_mode="r+") for c, f in files.items()}
        gaps = np.load(gap_file, mmap_mode="r+")
        extra = {k: np.load(f, mmap_mode="r+") for k, f in extra_files.items()}
        now = _done_crc(arrays, gaps, extra, files, gap_file, extra_files, 0, done, {})
        if now != crc:
            why = "the rows it had finished changed on disk"
            del arrays, gaps, extra
    if why is not None:
        if why != "not started":
            log(f"unfinished map store {root}: {why}; computing it from the start")
        done, crc = 0, {}
        arrays = {c: np.lib.format.open_memmap(f, mode="w+", dtype=np.float16, shape=(n, h, w))
                  for c, f in files.items()}
        gaps = np.lib.format.open_memmap(gap_file, mode="w+", dtype=np.float32,
                                         shape=(len(spec.counts), n))
        extra = {k: np.lib.format.open_memmap(f, mode="w+", dtype=np.int32, shape=(n,))
                 for k, f in extra_files.items()}
        _reserve(root, [*files.values(), gap_file, *extra_files.values()])
        np.save(root / "index.npy", index.numpy())
    chunk = make_chunks() if done < n else None
    bar = tqdm(total=n, initial=done, desc=desc, unit="img", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    start_done = done
    t0 = time.perf_counter()
    try:
        while done < n:
            assert chunk is not None
            stop = min(n, done + batch)
            maps, gap, more = chunk(done, stop)
            for c_i, c in enumerate(spec.counts):
                arrays[c][done:stop] = maps[c_i]
            gaps[:, done:stop] = gap
            for k, v in more.items():
                extra[k][done:stop] = v
            for arr in (*arrays.values(), gaps, *extra.values()):
                arr.flush()
            crc = _done_crc(arrays, gaps, extra, files, gap_file, extra_files, done, stop, crc)
            done = stop
            # Only after the chunk is on disk: a restart resumes from here, once the rows
            # done so far still give these checksums.
            write_json(progress_file, {"done": done, "crc": crc})
            bar.update(stop - bar.n)
    finally:
        bar.close()
    del arrays, gaps, extra
    measured["compute_seconds"] = time.perf_counter() - t0  # this run's share, if resumed
    measured["computed_images"] = n - start_done
    _finish(spec, root, files, gap_file, measured, extra_files)
    return n - start_done


def _reserve(root: Path, paths: list[Path]) -> None:
    """Give the new (sparse) memmap files their disk blocks now: on a full disk, writing a
    memmap's pages later kills the process with SIGBUS ("Bus error"), where reserving
    them here is an OSError, said in one line before any map is computed."""
    need = sum(p.stat().st_size for p in paths)
    try:
        for p in paths:
            fd = os.open(p, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, p.stat().st_size)
            finally:
                os.close(fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
            return
        raise KdigError(f"map store {root} needs {need / 2**20:,.1f} MB: {e.strerror or e}; "
                        f"free space there or point KDIG_CACHE at another disk") from None


def _resumable_state(progress_file: Path, shapes: dict[Path, tuple[tuple[int, ...], str]]
                     ) -> tuple[int, dict[str, int], str | None]:
    """An unfinished store's images done and their checksums, and why it cannot be resumed
    (None: it can). Each file must hold the array its header promises, whole: a memmap
    opened on a truncated file reads (and writes) past its end as zeros, and a resumed store
    finished 'complete' with all-zero maps."""
    if not progress_file.is_file():
        return 0, {}, "not started"
    try:
        state = json.loads(progress_file.read_text())
        done, crc = int(state["done"]), state["crc"]
        if not isinstance(crc, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return 0, {}, f"{progress_file.name} is unreadable or from an older version"
    for f, (shape, dtype) in shapes.items():
        if not f.is_file():
            return 0, {}, f"{f.name} is missing"
        try:
            with f.open("rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                got, _, got_dtype = read(fh)
                offset = fh.tell()
        except (ValueError, OSError) as e:
            return 0, {}, f"{f.name} has no readable header ({e})"
        expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
        if got != shape or got_dtype != np.dtype(dtype) or f.stat().st_size != expected:
            return 0, {}, (f"{f.name} is {f.stat().st_size:,} bytes of {got} {got_dtype}, "
                           f"not {expected:,} bytes of {shape} {dtype} (truncated or replaced)")
    if not 0 <= done <= shapes[next(iter(shapes))][0][0]:
        return 0, {}, f"{progress_file.name} counts {done} images done"
    return done, crc, None


def _done_crc(arrays: dict[int, np.ndarray], gaps: np.ndarray, extra: dict[str, np.ndarray],
              files: dict[int, Path], gap_file: Path, extra_files: dict[str, Path],
              start: int, stop: int, crc: dict[str, int]) -> dict[str, int]:
    """CRC-32 of every file's rows [0, stop), extended from ``crc`` (rows [0, start))."""
    out = dict(crc)
    parts = [(files[c].name, arrays[c][start:stop]) for c in arrays] + \
        [(f"{gap_file.name}[{i}]", gaps[i, start:stop]) for i in range(gaps.shape[0])] + \
        [(extra_files[k].name, v[start:stop]) for k, v in extra.items()]
    for name, rows in parts:
        out[name] = zlib.crc32(np.ascontiguousarray(rows).tobytes(), out.get(name, 0))
    return out


def _finish(spec: MapSpec, root: Path, files: dict[int, Path], gap_file: Path,
            measured: dict[str, Any], extra_files: dict[str, Path]) -> None:
    gaps = np.load(gap_file)
    gap_stats = {}
    for c_i, c in enumerate(spec.counts):
        g = gaps[c_i]
        if np.isnan(g).all():  # a source without a completeness property
            gap_stats[str(c)] = {k: float("nan") for k in ("median", "p90", "max", "mean")}
            continue
        gap_stats[str(c)] = {"median": float(np.median(g)), "p90": float(np.quantile(g, 0.9)),
                             "max": float(g.max()), "mean": float(g.mean())}
    names = [f.name for f in files.values()] + [gap_file.name, "index.npy"] + \
        [f.name for f in extra_files.values()]
    if "points" in extra_files:  # adaptive IG: how many points the images needed
        pts = np.load(extra_files["points"])
        measured |= {"points_mean": float(pts.mean()), "points_median": float(np.median(pts)),
                     "points_histogram": {str(int(v)): int(c) for v, c in
                                          zip(*np.unique(pts, return_counts=True), strict=True)}}
    meta = {
        "spec": asdict(spec),
        "gap": gap_stats,
        "measured": measured,
        "checksums": {name: file_sha256(root / name) for name in names},
        "sizes": {name: (root / name).stat().st_size for name in names},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (root / "progress.json").unlink(missing_ok=True)
    write_json(root / "meta.json", meta)  # written last: its presence marks a finished store
