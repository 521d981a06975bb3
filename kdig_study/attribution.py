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
from collections.abc import Callable, Iterator, Sequence
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
from kdig_study.paths import cache_dir, file_sha256, locked, write_json

# Our own nested rules plus Captum's rules, used through Captum's own alpha/weight builders.
METHODS: tuple[str, ...] = ("trapezoid", "clenshaw_curtis", "gausslegendre", "riemann_middle",
                            "riemann_left", "riemann_right", "riemann_trapezoid")
_STORE_VERSION = 2  # 2: map sources


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
    if method == "clenshaw_curtis":
        return clenshaw_curtis(steps)
    step_sizes, alpha_fn = approximation_parameters(method)
    return list(alpha_fn(steps)), list(step_sizes(steps))


def clenshaw_curtis(n: int) -> tuple[list[float], list[float]]:
    """Clenshaw-Curtis on [0, 1] with n intervals: the n + 1 points (1 - cos(j pi / n)) / 2
    and weights that integrate every polynomial of degree <= n exactly. Written here
    because neither Captum nor SciPy has it; it nests like the trapezoid rule (the points of
    n are among those of 2n) and converges like Gauss for smooth integrands.

    Weights: the moment equations in the Chebyshev basis, sum_j w_j T_k(t_j) =
    integral_{-1}^{1} T_k = 2 / (1 - k^2) (k even; 0 for odd k), solved exactly (the
    Chebyshev-Vandermonde matrix on these points is well conditioned), halved for [0, 1]."""
    if n < 1:
        raise ValueError("Clenshaw-Curtis needs at least one interval")
    j = np.arange(n + 1)
    t = np.cos(np.pi * j / n)  # 1 .. -1
    k = np.arange(n + 1)
    vander = np.cos(np.outer(k, np.arccos(t)))  # T_k(t_j)
    moments = np.zeros(n + 1)
    even = k[k % 2 == 0]
    moments[even] = 2.0 / (1.0 - even.astype(float) ** 2)
    w = np.linalg.solve(vander, moments) / 2
    alphas = (1 - t) / 2  # 0 .. 1
    return [float(a) for a in alphas], [float(x) for x in w]


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
            x = ((images[start:stop].to(device).float() / 255 - mean_t) / std_t).contiguous(
                memory_format=torch.channels_last)
            base = make_baseline(spec.baseline, x, mean_t, std_t)
            with autocast(spec.precision, device):
                if adaptive:
                    from kdig_study.adaptive import adaptive_ig
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
                            measured if measured is not None else {}, extras)
        meta, why = _verify(root)
        if meta is None:  # pragma: no cover - a failure of the disk under us
            raise KdigError(f"map store {root} failed its own check after writing: {why}")
        return BuildReport(MapStore(root, meta), computed, time.perf_counter() - t0, note)


def _compute(spec: MapSpec, root: Path, index: torch.Tensor, size: tuple[int, int],
             make_chunks: Callable[[], ChunkFn], batch: int, desc: str, progress: bool,
             measured: dict[str, Any], extras: tuple[str, ...]) -> int:
    n, (h, w) = spec.n_images, size
    root.mkdir(parents=True, exist_ok=True)
    files = {c: root / f"maps_s{c}.npy" for c in spec.counts}
    gap_file = root / "gaps.npy"
    extra_files = {name: root / f"{name}.npy" for name in extras}
    progress_file = root / "progress.json"
    done = 0
    if progress_file.is_file() and all(f.is_file() for f in [*files.values(), gap_file,
                                                               *extra_files.values()]):
        done = json.loads(progress_file.read_text())["done"]
        arrays = {c: np.load(f, mmap_mode="r+") for c, f in files.items()}
        gaps = np.load(gap_file, mmap_mode="r+")
        extra = {k: np.load(f, mmap_mode="r+") for k, f in extra_files.items()}
    else:
        arrays = {c: np.lib.format.open_memmap(f, mode="w+", dtype=np.float16, shape=(n, h, w))
                  for c, f in files.items()}
        gaps = np.lib.format.open_memmap(gap_file, mode="w+", dtype=np.float32,
                                         shape=(len(spec.counts), n))
        extra = {k: np.lib.format.open_memmap(f, mode="w+", dtype=np.int32, shape=(n,))
                 for k, f in extra_files.items()}
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
            done = stop
            # Only after the chunk is on disk: a restart resumes from here.
            write_json(progress_file, {"done": done})
            bar.update(stop - bar.n)
    finally:
        bar.close()
    del arrays, gaps, extra
    measured["compute_seconds"] = time.perf_counter() - t0  # this run's share, if resumed
    measured["computed_images"] = n - start_done
    _finish(spec, root, files, gap_file, measured, extra_files)
    return n - start_done


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
                                          zip(*np.unique(pts, return_counts=True))}}
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
