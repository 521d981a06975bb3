"""Integrated Gradients over a data set: the quadrature rules, the batched integrator, and
the on-disk map store.

IG of image x for its label y against a baseline b (Sundararajan et al. 2017):
    attr = (x - b) * integral_0^1 d f_y(b + a (x - b)) / dx da,
approximated by a weighted sum over points a_k. Map = a channel reduction of attr
(the paper: sum over channels of |attr|), one 32x32 map per training image.

Why a hand-written integrator instead of calling Captum for every image: Captum is the
reference (tests compare against it), but it evaluates one step count per call. A study
searches over step counts; with a nested rule (trapezoid on 8/16/32/64 intervals: every
coarser grid is a subset of the finest) one pass over the finest grid yields the maps of
every count at once, for 65 gradient evaluations per image instead of 9+17+33+65 = 124.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from captum.attr._utils.approximation_methods import approximation_parameters
from tqdm import tqdm

from kdig_study.config import IGConfig
from kdig_study.engine import autocast
from kdig_study.errors import KdigError
from kdig_study.models import Net, fold_batchnorm
from kdig_study.paths import cache_dir, locked, write_json

# Our own nested rule plus Captum's rules, used through Captum's own alpha/weight builders.
METHODS: tuple[str, ...] = ("trapezoid", "gausslegendre", "riemann_middle", "riemann_left",
                            "riemann_right", "riemann_trapezoid")
_STORE_VERSION = 1


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """Points a_k in [0, 1] and weights w_k of one rule with ``steps`` steps.

    ``trapezoid``: ``steps`` intervals, so steps + 1 points (both ends), weights summing to 1.
    (Captum's ``riemann_trapezoid`` with n steps puts n points on linspace(0, 1, n) but gives
    them weights 1/n, which sum to (n - 1)/n: every attribution comes out (n - 1)/n too small.
    Ours on ``steps`` intervals equals Captum's on steps + 1 points times (steps + 1)/steps.)
    Every other method is Captum's, with Captum's alphas and step sizes.
    """
    if method == "trapezoid":
        if steps < 1:
            raise ValueError("trapezoid needs at least one interval")
        alphas = [i / steps for i in range(steps + 1)]
        weights = [1.0 / steps] * (steps + 1)
        weights[0] /= 2
        weights[-1] /= 2
        return alphas, weights
    step_sizes, alpha_fn = approximation_parameters(method)
    return list(alpha_fn(steps)), list(step_sizes(steps))


def union_rule(method: str, counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One set of points serving several step counts.

    Returns alphas [K] and weights [len(counts), K] (zero where a count does not use a
    point). With a nested rule K is the finest count's points; otherwise the union.
    """
    keyed: dict[float, int] = {}
    per_count = []
    for n in counts:
        alphas, weights = quadrature(method, n)
        per_count.append((alphas, weights))
        for a in alphas:
            keyed.setdefault(round(a, 12), len(keyed))
    alpha_t = torch.zeros(len(keyed), dtype=torch.float64)
    for a, k in keyed.items():
        alpha_t[k] = a
    weight_t = torch.zeros(len(counts), len(keyed), dtype=torch.float64)
    for c, (alphas, weights) in enumerate(per_count):
        for a, w in zip(alphas, weights):
            weight_t[c, keyed[round(a, 12)]] += w
    return alpha_t, weight_t


def make_baseline(kind: str, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                  ) -> torch.Tensor:
    """Baselines in the normalised input space. x: [B, 3, H, W] normalised.

    zeros: the all-zero normalised input (the data set's mean colour; the paper's choice);
    black: a black image; blur: the image under a strong Gaussian blur (sigma 5 px).
    """
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "black":
        return ((0.0 - mean) / std).expand_as(x).contiguous(memory_format=torch.channels_last)
    if kind == "blur":
        return TF.gaussian_blur(x, kernel_size=[21, 21], sigma=[5.0, 5.0])
    raise ValueError(f"unknown baseline {kind!r}")


def reduce_channels(attr: torch.Tensor, how: str) -> torch.Tensor:
    """[..., 3, H, W] -> [..., H, W]."""
    if how == "abs_sum":
        return attr.abs().sum(-3)
    if how == "sum_abs":
        return attr.sum(-3).abs()
    if how == "l2":
        return attr.pow(2).sum(-3).sqrt()
    raise ValueError(f"unknown reduction {how!r}")


@contextlib.contextmanager
def _frozen(model: Net) -> Iterator[Net]:
    """Eval mode with no parameter gradients: IG needs gradients w.r.t. the input only."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


@dataclass
class IGBatch:
    attributions: torch.Tensor  # [C, B, 3, H, W] float32, one per step count
    delta: torch.Tensor  # [B] f_y(x) - f_y(baseline)


def integrated_gradients(model: Net, x: torch.Tensor, target: torch.Tensor,
                         baseline: torch.Tensor, alphas: torch.Tensor, weights: torch.Tensor,
                         internal_batch: int = 256) -> IGBatch:
    """IG for images ``x`` ([B, 3, H, W] normalised) at several step counts in one pass.

    alphas [K], weights [C, K] from :func:`union_rule`. Gradients are evaluated at
    min(K, internal_batch // B) points at a time (at least one), i.e. about
    ``internal_batch`` images per forward/backward.
    """
    b = x.shape[0]
    device = x.device
    diff = x - baseline
    w = weights.to(device=device, dtype=torch.float32)
    acc = torch.zeros((w.shape[0], *x.shape), device=device)  # [C, B, 3, H, W]
    per_pass = max(1, internal_batch // b)
    tgt = target.to(device)
    # f_y at the path's ends, for the completeness check; a rule that evaluates a = 0 or
    # a = 1 (trapezoid) gets them from its own pass instead of extra forwards.
    ends: dict[float, torch.Tensor] = {}
    with _frozen(model), torch.enable_grad():
        for start in range(0, alphas.numel(), per_pass):
            a = alphas[start: start + per_pass].to(device=device, dtype=torch.float32)
            k = a.numel()
            pts = (baseline.unsqueeze(0) + a.view(k, 1, 1, 1, 1) * diff.unsqueeze(0))
            pts = pts.reshape(k * b, *x.shape[1:]).contiguous(
                memory_format=torch.channels_last).requires_grad_(True)
            out = model(pts)  # [k*B, classes]
            picked = out.gather(1, tgt.repeat(k).view(-1, 1)).view(k, b)
            (grad,) = torch.autograd.grad(picked.sum(), pts)
            # [C, k] x [k, B*3*H*W]: weight the gradients of this pass into each count's sum
            acc += (w[:, start: start + k] @ grad.reshape(k, -1).float()).view_as(acc)
            for j, alpha in enumerate(alphas[start: start + k].tolist()):
                if alpha in (0.0, 1.0):
                    ends[alpha] = picked[j].detach().float()
        missing = [alpha for alpha in (1.0, 0.0) if alpha not in ends]
        if missing:
            with torch.no_grad():
                inputs = torch.cat([x if alpha == 1.0 else baseline for alpha in missing])
                out = model(inputs.contiguous(memory_format=torch.channels_last))
                fy = out.gather(1, tgt.repeat(len(missing)).view(-1, 1)).view(-1, b).float()
            ends.update(zip(missing, fy))
    return IGBatch(attributions=diff.unsqueeze(0).float() * acc, delta=ends[1.0] - ends[0.0])


def relative_gap(attr: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Completeness gap |sum(attr) - (f(x) - f(b))| / max(|f(x) - f(b)|, 1e-6).

    attr [..., B, 3, H, W], delta [B] -> [..., B]."""
    total = attr.flatten(-3).sum(-1)
    return (total - delta).abs() / delta.abs().clamp_min(1e-6)


# ---------------------------------------------------------------------------------------------
# The map store


@dataclass(frozen=True)
class MapSpec:
    """Everything that decides a store's contents."""

    teacher: str  # teacher fingerprint
    data: str  # data bundle fingerprint
    images: str  # hash of the source indices of the images (which images, in which order)
    n_images: int
    method: str
    baseline: str
    reduce: str
    counts: tuple[int, ...]
    precision: str  # resolved: fp32 or bf16 (autocast around the integrator)

    def key(self) -> str:
        blob = json.dumps([_STORE_VERSION, asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def index_hash(index: torch.Tensor) -> str:
    return hashlib.sha256(index.to(torch.int64).numpy().tobytes()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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

    def maps(self, steps: int) -> np.ndarray:
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
        return self.meta["gap"][str(steps)]


def store_root(spec: MapSpec) -> Path:
    return cache_dir() / "ig" / spec.key()


def _verify(root: Path) -> tuple[dict[str, Any] | None, str]:
    """(meta, "") for a complete, intact store; (None, why) otherwise."""
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        return None, "not finished"
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        return None, "meta.json unreadable"
    for name, digest in meta["checksums"].items():
        f = root / name
        if not f.is_file():
            return None, f"{name} missing"
        if f.stat().st_size != meta["sizes"][name]:
            return None, f"{name} truncated ({f.stat().st_size} of {meta['sizes'][name]} bytes)"
        if _sha256(f) != digest:
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


def build_store(spec: MapSpec, teacher: Net, images: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor, mean: Sequence[float], std: Sequence[float], cfg: IGConfig,
                device: torch.device, progress: bool = True, log: Any = print) -> BuildReport:
    """Open the store for ``spec``, or compute it: resumable chunk by chunk, locked so that
    concurrent workers compute it once, checksummed when finished.

    images: [N, 3, H, W] uint8, un-augmented, in training-row order; labels [N]; index [N]
    their source indices.
    """
    root = store_root(spec)
    t0 = time.perf_counter()
    with locked(root):
        meta, why = _verify(root)
        if meta is not None:
            return BuildReport(MapStore(root, meta), 0, time.perf_counter() - t0, "")
        note = ""
        if why != "not finished":
            note = f"IG map store {root} was damaged ({why}); recomputing it"
            log(note)
            shutil.rmtree(root)
        computed = _compute(spec, root, teacher, images, labels, index, mean, std, cfg, device,
                            progress)
        meta, why = _verify(root)
        if meta is None:  # pragma: no cover - a failure of the disk under us
            raise KdigError(f"IG map store {root} failed its own check after writing: {why}")
        return BuildReport(MapStore(root, meta), computed, time.perf_counter() - t0, note)


def _compute(spec: MapSpec, root: Path, teacher: Net, images: torch.Tensor,
             labels: torch.Tensor, index: torch.Tensor, mean: Sequence[float],
             std: Sequence[float], cfg: IGConfig, device: torch.device, progress: bool) -> int:
    n, (h, w) = images.shape[0], images.shape[-2:]
    root.mkdir(parents=True, exist_ok=True)
    files = {c: root / f"maps_s{c}.npy" for c in spec.counts}
    gap_file = root / "gaps.npy"
    progress_file = root / "progress.json"
    done = 0
    if progress_file.is_file() and all(f.is_file() for f in files.values()) and gap_file.is_file():
        done = json.loads(progress_file.read_text())["done"]
        arrays = {c: np.load(f, mmap_mode="r+") for c, f in files.items()}
        gaps = np.load(gap_file, mmap_mode="r+")
    else:
        arrays = {c: np.lib.format.open_memmap(f, mode="w+", dtype=np.float16, shape=(n, h, w))
                  for c, f in files.items()}
        gaps = np.lib.format.open_memmap(gap_file, mode="w+", dtype=np.float32,
                                         shape=(len(spec.counts), n))
        np.save(root / "index.npy", index.numpy())
    alphas, weights = union_rule(spec.method, spec.counts)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    teacher = fold_batchnorm(teacher).to(device).to(memory_format=torch.channels_last)
    bar = tqdm(total=n, initial=done, desc=f"IG maps ({alphas.numel()} points/image)",
               unit="img", disable=not progress, dynamic_ncols=True, mininterval=0.5)
    start_done = done
    try:
        while done < n:
            stop = min(n, done + cfg.batch_size)
            x = ((images[done:stop].to(device).float() / 255 - mean_t) / std_t).contiguous(
                memory_format=torch.channels_last)
            base = make_baseline(spec.baseline, x, mean_t, std_t)
            with autocast(spec.precision, device):
                res = integrated_gradients(teacher, x, labels[done:stop], base, alphas, weights,
                                           cfg.internal_batch)
            maps = reduce_channels(res.attributions, spec.reduce).cpu().numpy()
            gap = relative_gap(res.attributions, res.delta).cpu().numpy()
            for c_i, c in enumerate(spec.counts):
                arrays[c][done:stop] = maps[c_i]
            gaps[:, done:stop] = gap
            for arr in (*arrays.values(), gaps):
                arr.flush()
            done = stop
            # Only after the chunk is on disk: a restart resumes from here.
            write_json(progress_file, {"done": done})
            bar.update(stop - bar.n)
    finally:
        bar.close()
    del arrays, gaps
    _finish(spec, root, files, gap_file, cfg)
    return n - start_done


def _finish(spec: MapSpec, root: Path, files: dict[int, Path], gap_file: Path,
            cfg: IGConfig) -> None:
    gaps = np.load(gap_file)
    gap_stats = {}
    for c_i, c in enumerate(spec.counts):
        g = gaps[c_i]
        gap_stats[str(c)] = {"median": float(np.median(g)), "p90": float(np.quantile(g, 0.9)),
                             "max": float(g.max()), "mean": float(g.mean())}
    names = [f.name for f in files.values()] + [gap_file.name, "index.npy"]
    meta = {
        "spec": asdict(spec),
        "gap": gap_stats,
        "max_gap": cfg.max_gap,
        "checksums": {name: _sha256(root / name) for name in names},
        "sizes": {name: (root / name).stat().st_size for name in names},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (root / "progress.json").unlink(missing_ok=True)
    write_json(root / "meta.json", meta)  # written last: its presence marks a finished store
