"""One student run from a study config: the glue between config, data, the cached teacher, the
engine and the measurements. The train CLI, the Optuna objective and the ablation runner all
call :func:`run_student`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kdig_study.attribution.sources import DERIVED, captum_chunks, derived_chunks, source_spec
from kdig_study.attribution.store import (
    BuildReport,
    MapSpec,
    MapStore,
    build_store,
    index_hash,
    write_store,
)
from kdig_study.checkpoint import run_resume, until_ended
from kdig_study.config import StudyConfig
from kdig_study.corruptions import RobustAccuracy, RobustSuite, robust_metric
from kdig_study.data import DataBundle, load_bundle
from kdig_study.engine import (
    Distillation,
    EpochCallback,
    TrainResult,
    bf16_kernels,
    resolve_device,
    resolve_precision,
    seeded_model,
    train,
)
from kdig_study.errors import KdigError
from kdig_study.measure import model_cost
from kdig_study.models import Net, build_model, count_params, taps
from kdig_study.overlay import IGOverlay, save_preview, source_gallery
from kdig_study.paths import atomic_write, cache_dir
from kdig_study.teacher import Teacher, get_teacher
from kdig_study.teacher_outputs import TeacherStream, device_kind


def ig_counts(cfg: StudyConfig) -> tuple[int, ...]:
    """Every IG step count the study may use: its default and the search choices; (0,) in
    adaptive mode (one map per image, whatever the step count)."""
    if cfg.ig.target_gap:
        return (0,)
    counts = {cfg.ig.steps}
    spec = cfg.search.space.get("ig_steps")
    if spec is not None:
        counts |= {int(c) for c in spec.choices}
    return tuple(sorted(counts))


def store_counts(cfg: StudyConfig, steps: int) -> tuple[int, ...]:
    """The step counts of the store that serves ``steps``: the study's set when it holds
    them (one nested pass), else that count alone."""
    counts = ig_counts(cfg)
    return counts if cfg.ig.target_gap or steps in counts else (steps,)


def adaptive_spec_fields(cfg: StudyConfig) -> dict[str, object]:
    """MapSpec fields of adaptive IG: the rule, its settings, one map per image."""
    ig = cfg.ig
    return {"method": f"adaptive-{ig.adaptive_rule}", "counts": (0,),
            "options": json.dumps({"target_gap": ig.target_gap, "start": ig.adaptive_start,
                                   "cap": ig.adaptive_cap}, sort_keys=True)}


@dataclass
class Context:
    """What every run of one study shares: data, device, and (lazily) the teacher."""

    cfg: StudyConfig
    data: DataBundle
    device: torch.device
    progress: bool = True
    log: Any = print
    _teacher: Teacher | None = field(default=None, repr=False)
    # ("ig", counts) -> the IG store; (source, IG store's folder name) -> a source's maps
    _maps: dict[tuple[str, Any], BuildReport] = field(default_factory=dict, repr=False)
    _costs: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)
    _suite: RobustSuite | None = field(default=None, repr=False)

    @classmethod
    def create(cls, cfg: StudyConfig, data_dir: str | None = None, device: str = "auto",
               progress: bool = True) -> Context:
        return cls(cfg, load_bundle(cfg.data, data_dir, progress), resolve_device(device),
                   progress)

    def with_config(self, cfg: StudyConfig) -> Context:
        """The same data, device and corruption suite for another config of the same data
        (e.g. another teacher seed): its teacher and maps are its own."""
        return Context(cfg, self.data, self.device, self.progress, self.log,
                       _suite=self._suite)

    def teacher(self) -> Teacher:
        if self._teacher is None:
            self._teacher = get_teacher(self.cfg, self.data, self.device, self.progress,
                                        log=self.log)
        return self._teacher

    def precisions(self) -> dict[str, str]:
        """What each part of the study runs at here, "auto" resolved on this device: the
        teacher's and the maps' fingerprints depend on it, so a study records it."""
        cfg, dev = self.cfg, self.device
        out = {"teacher": resolve_precision(cfg.teacher_train.precision, dev),
               "maps": resolve_precision(cfg.ig.precision, dev),
               "students": resolve_precision(cfg.student_train.precision, dev)}
        if cfg.teacher.weights:  # a given teacher's fingerprint is its file's alone
            del out["teacher"]
        return out

    def study_identity(self) -> dict[str, Any]:
        """What a study made here records and checks besides its config (store.open_study):
        the data, and the precision on this device."""
        return {"data_fingerprint": self.data.fingerprint, "data_origin": self.data.origin,
                "precision": self.precisions(), "device": device_kind(self.device)}

    def map_spec(self, counts: tuple[int, ...] | None = None,
                 precision: str | None = None) -> MapSpec:
        """The spec of the IG store (the other sources derive their specs from it)."""
        cfg = self.cfg
        _, index = self.data.train_subset(cfg.student_train.train_size)
        spec = MapSpec(teacher=self.teacher().fingerprint, data=self.data.fingerprint,
                       images=index_hash(index), n_images=int(index.numel()),
                       method=cfg.ig.method, baseline=cfg.ig.baseline, reduce=cfg.ig.reduce,
                       counts=counts or ig_counts(cfg),
                       precision=precision or resolve_precision(cfg.ig.precision, self.device))
        if cfg.ig.target_gap:
            spec = dataclasses.replace(spec, **adaptive_spec_fields(cfg))  # type: ignore[arg-type]
        return spec

    def maps(self, counts: tuple[int, ...] | None = None, source: str | None = None,
             steps: tuple[int, ...] | None = None) -> BuildReport:
        """The teacher's maps from ``source`` (default: the study's) for the students'
        training images: computed once, cached. Sources other than IG are built beside the
        IG store of the same counts (shuffled and random are made from it). ``steps``: the
        step counts the caller trains with, whose completeness gap is checked (default:
        every count of the store; a fixed ablation at 16 steps is not refused for the 8-step
        maps that share its nested pass)."""
        counts = counts or ig_counts(self.cfg)
        source = source or self.cfg.ig.source
        ig = self._ig_maps(counts, tuple(s for s in steps or () if s in counts) or counts)
        key = (source, ig.store.root.name)  # a source's maps are made from this IG store
        if key in self._maps:
            return self._maps[key]
        if source == "ig":
            report = ig
        else:
            report = self._source_maps(source, ig.store)
        self._maps[key] = report
        return report

    def _ig_maps(self, counts: tuple[int, ...], checked: tuple[int, ...]) -> BuildReport:
        """The IG store of ``counts``, its maps at the ``checked`` step counts checked: a
        median completeness gap above ig.max_gap is recomputed in fp32 if it was bf16, and
        stops the run if it is still above."""
        cfg = self.cfg
        # every run asks: a store already checked is only re-checked (its gaps are in its meta)
        report, precision = self._maps.get(("ig", counts)), None
        while True:
            if report is None:
                spec = self.map_spec(counts, precision)
                train_set, index = self.data.train_subset(cfg.student_train.train_size)
                report = build_store(spec, self.teacher().model, train_set.images,
                                     train_set.labels, index, self.data.mean, self.data.std,
                                     cfg.ig, self.device, self.progress, log=self.log)
            # `not gap <= max_gap`: a NaN gap (a non-finite teacher) fails the check too
            bad = {s: report.store.gap(s)["median"] for s in checked
                   if not report.store.gap(s)["median"] <= cfg.ig.max_gap}
            if not bad:
                self._maps[("ig", counts)] = report
                return report
            worst = ", ".join(f"{s} steps: {g:.2%}" for s, g in bad.items())
            if report.store.meta["spec"]["precision"] == "bf16":
                self.log(f"IG maps under bf16 have a median completeness gap above "
                         f"ig.max_gap = {cfg.ig.max_gap:.2%} ({worst}); using fp32 maps instead "
                         f"(computed once, then read from the cache)")
                report, precision = None, "fp32"
                continue
            raise KdigError(f"IG maps ({cfg.ig.method} rule, fp32) have a median completeness "
                            f"gap above ig.max_gap = {cfg.ig.max_gap:.2%} ({worst}); use more "
                            f"steps (search.space.ig_steps, ig.steps) or another ig.method; "
                            f"store {report.store.root}")

    def _source_maps(self, source: str, ig_store: MapStore) -> BuildReport:
        cfg = self.cfg
        train_set, index = self.data.train_subset(cfg.student_train.train_size)
        ig_spec = MapSpec(**{**ig_store.meta["spec"], "counts": ig_store.counts})
        spec = source_spec(ig_spec, source, cfg.ig, ig_store)
        size = tuple(train_set.images.shape[-2:])
        measured: dict[str, Any] = {}
        if source in DERIVED:
            return write_store(spec, index, size,  # type: ignore[arg-type]
                               lambda: derived_chunks(source, ig_store, spec.counts, cfg.ig,
                                                      train_set.labels, measured),
                               batch=4096, desc=f"{source} maps", progress=self.progress,
                               log=self.log, measured=measured)
        teacher = self.teacher().model
        return write_store(spec, index, size,  # type: ignore[arg-type]
                           lambda: captum_chunks(spec, teacher, train_set.images,
                                                 train_set.labels, self.data.mean,
                                                 self.data.std, cfg.ig, self.device),
                           batch=cfg.ig.batch_size, desc=f"{source} maps (Captum)",
                           progress=self.progress, log=self.log)

    def robust_suite(self) -> RobustSuite | None:
        """The corrupted validation and test splits (built once per data set, cached)."""
        if self._suite is None and self.cfg.robustness.enabled:
            self._suite = RobustSuite(self.data, self.cfg.robustness)
        return self._suite

    def student_cost(self, cfg: StudyConfig, model: Net) -> dict[str, int]:
        """Parameters, FLOPs, bytes of the student (same for every run of one shape)."""
        key = repr(cfg.student)
        if key not in self._costs:
            self._costs[key] = model_cost(model, self.data.image_size) | {
                "teacher_params": teacher_params(cfg, len(self.data.classes))}
        return self._costs[key]

    def preview(self, store: MapStore, steps: int, n: int = 8) -> Path:
        """The store's preview grid (images, maps, overlays) for ``steps``, made once."""
        path = store.root / f"preview_s{store.variant(steps)}_n{n}.png"
        if not self._intact_png(path):
            train_set, _ = self.data.train_subset(self.cfg.student_train.train_size)
            n = min(n, len(train_set))
            maps = torch.from_numpy(store.maps(steps)[:n].astype(np.float32))
            save_preview(path, train_set.images[:n], maps, self.cfg.ig.overlay_strength)
        return path

    def _intact_png(self, path: Path) -> bool:
        """A cached figure that decodes; a damaged one is said, and made again."""
        if not path.is_file():
            return False
        try:
            with Image.open(path) as im:
                im.load()
            return True
        except (OSError, SyntaxError, ValueError):  # PIL's errors for a bad or cut file
            self.log(f"cached figure {path} is damaged; making it again")
            return False

    def gallery(self, sources: list[str], n: int = 4) -> Path:
        """One image per source row (image, map, overlay) for the first ``n`` training
        images, at the study's IG step count (cached beside the stores)."""
        steps = self.cfg.ig.steps
        counts = store_counts(self.cfg, steps)
        stores = {s: self.maps(counts, s, (steps,)).store for s in sources}
        key = hashlib.sha256(json.dumps([[s.root.name for s in stores.values()], n, steps,
                                         self.cfg.ig.overlay_strength]).encode()).hexdigest()
        path = cache_dir() / "ig" / "galleries" / f"{key[:20]}.png"
        if not self._intact_png(path):
            train_set, _ = self.data.train_subset(self.cfg.student_train.train_size)
            n = min(n, len(train_set))
            maps = {s: torch.from_numpy(st.maps(steps)[:n].astype(np.float32))
                    for s, st in stores.items()}
            grid = source_gallery(train_set.images[:n], maps, self.cfg.ig.overlay_strength)
            atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        return path


@dataclass(frozen=True)
class RunMetrics:
    """What one student run measured. :meth:`stored` is the flat record a trial keeps as its
    "metrics" attribute; the corruption breakdown is ``robust.breakdown()``."""

    val_acc: float
    test_acc: float
    best_epoch: int
    epochs_run: int
    train_images: int
    train_images_per_s: float
    params: int
    flops: int
    bytes: int
    compression: float  # teacher parameters / student parameters
    seed: int
    precision: str
    eval_s: float  # clean evaluation (validation every epoch, test once)
    wall_s: float  # the whole run: setup, training, evaluation
    robust: RobustAccuracy | None = None  # None: the corruption suite is off
    # with the overlay on: its map source, step count, store, preview and completeness gap
    # (None for sources without one)
    source: str | None = None
    ig_steps: int | None = None
    ig_store: str | None = None
    ig_preview: str | None = None
    ig_gap_median: float | None = None
    # KD/AT runs: steps whose teacher outputs came from the cache, and steps that ran it
    teacher_steps_cached: int = 0
    teacher_steps_computed: int = 0
    # the CPU's bf16 kernel family (engine.bf16_kernels): None off the CPU or at fp32
    kernels: str | None = None

    def stored(self) -> dict[str, Any]:
        """The figures a trial records, by their stored names (what reports read back)."""
        out: dict[str, Any] = {
            "val_acc": self.val_acc, "test_acc": self.test_acc, "params": self.params,
            "flops": self.flops, "bytes": self.bytes, "compression": self.compression,
            "best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "seed": self.seed,
            "precision": self.precision, "train_images": self.train_images,
            "eval_s": self.eval_s, "train_eval_s": self.wall_s,
            "teacher_steps_cached": self.teacher_steps_cached,
            "teacher_steps_computed": self.teacher_steps_computed} | self._robust_means()
        out |= {k: v for k, v in (("source", self.source), ("ig_steps", self.ig_steps),
                                  ("ig_gap_median", self.ig_gap_median),
                                  ("kernels", self.kernels)) if v is not None}
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every field, the corruption breakdown flattened as robust_test_<key> (JSON)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "robust"}
        out |= self._robust_means()
        if self.robust is not None:
            out |= {robust_metric(k): v for k, v in self.robust.breakdown().items()}
        return out

    def _robust_means(self) -> dict[str, float]:
        r = self.robust
        return {} if r is None else {"robust_test_acc": r.test_acc, "robust_val_acc": r.val_acc,
                                     "robust_eval_s": r.eval_s}


@dataclass
class StudentRun:
    model: Net
    result: TrainResult
    metrics: RunMetrics


def teacher_params(cfg: StudyConfig, num_classes: int = 10) -> int:
    return count_params(build_model(cfg.teacher, num_classes))


def teacher_stream(ctx: Context, cfg: StudyConfig, teacher_fingerprint: str,
                   pool_rows: torch.Tensor, tap: int | str | None) -> TeacherStream:
    """The teacher-output cache of this run's data stream: keyed by everything the stream's
    images and the teacher's outputs on them depend on (``pool_rows``: the source-pool rows
    trained on, in order; ``tap``: the AT tap, None without AT)."""
    tc, data = cfg.student_train, ctx.data
    fields = {
        "teacher": teacher_fingerprint, "data": data.fingerprint,
        "rows": hashlib.sha256(pool_rows.to(torch.int64).numpy().tobytes()).hexdigest(),
        "seed": tc.seed, "batch_size": tc.batch_size,
        "drop_last": len(pool_rows) > tc.batch_size,
        "pad": data.pad if tc.pad < 0 else tc.pad, "flip": data.flip,
        "precision": resolve_precision(tc.precision, ctx.device),
        "device": device_kind(ctx.device), "torch": torch.__version__,
        "compile": tc.compile, "tap": tap}
    return TeacherStream(fields, epochs=tc.epochs, max_bytes=cfg.teacher_cache.max_mb * 2**20,
                         log=ctx.log)


def run_student(ctx: Context, cfg: StudyConfig | None = None, *,
                on_epoch: EpochCallback | None = None, desc: str = "student",
                rows: torch.Tensor | None = None) -> StudentRun:
    """Train one student with the method switches of ``cfg`` (default: the context's).

    ``rows``: train on these rows of the students' training set only (Monte-Carlo subsets);
    their IG maps follow them.
    """
    cfg = cfg or ctx.cfg
    data = ctx.data
    t0 = time.perf_counter()
    n_classes = len(data.classes)
    model = seeded_model(lambda: build_model(cfg.student, n_classes), cfg.student_train.seed)
    train_set, index = data.train_subset(cfg.student_train.train_size)
    m = cfg.method
    # what the run's result depends on beyond its config: the data, the teacher, the rows
    identity: list[Any] = [
        "student", cfg.fingerprint(), data.fingerprint,
        ctx.teacher().fingerprint if m.kd or m.at or m.ig else None,
        None if rows is None else hashlib.sha256(rows.to(torch.int64).numpy().tobytes()
                                                 ).hexdigest(),
        device_kind(ctx.device), resolve_precision(cfg.student_train.precision, ctx.device)]
    distill = None
    if cfg.method.kd or cfg.method.at:
        teacher = ctx.teacher()
        s_tap, t_tap = taps(model, cfg.student, cfg.teacher)
        distill = Distillation(teacher=teacher.model, kd=cfg.kd if cfg.method.kd else None,
                               at_weight=cfg.at.weight if cfg.method.at else 0.0,
                               tap=s_tap, teacher_tap=t_tap)
        if cfg.teacher_cache.enabled:
            distill = dataclasses.replace(distill, outputs=teacher_stream(
                ctx, cfg, teacher.fingerprint, index if rows is None else index[rows],
                t_tap if distill.use_at else None))
    planes, overlay, ig_info = None, None, {}
    if cfg.method.ig:
        source = cfg.ig.source
        store = ctx.maps(store_counts(ctx.cfg, cfg.ig.steps), source, (cfg.ig.steps,)).store
        if not np.array_equal(store.index(), index.numpy()):  # docs/design.md, defect 1
            raise KdigError(f"map store {store.root} is for other images than this run's "
                            f"training set")
        identity.append(store.root.name)  # e.g. the fp32 maps a bf16 gap fell back to
        planes = store.planes(cfg.ig.steps)  # [N, 1, 32, 32], row i = training image i
        if rows is not None:
            planes = planes[rows]
        overlay = IGOverlay(cfg.ig.overlay_prob, cfg.ig.overlay_strength,
                            cfg.ig.exponent_low, cfg.ig.exponent_high)
        gap = store.gap(cfg.ig.steps)["median"]
        ig_info = {"source": source, "ig_steps": cfg.ig.steps, "ig_store": str(store.root),
                   "ig_preview": str(ctx.preview(store, cfg.ig.steps)),
                   # nan for sources without a completeness gap
                   "ig_gap_median": gap if gap == gap else None}
    if rows is not None:
        train_set = train_set.take(rows)
    suite = ctx.robust_suite()  # read (or rebuilt, if damaged) before training, not after
    resume = run_resume(cfg.checkpoint, identity, ctx.log)
    with until_ended(resume):
        result = train(model, train_set, data, cfg.student_train, device=ctx.device,
                       distill=distill, planes=planes, overlay=overlay, on_epoch=on_epoch,
                       progress=ctx.progress, desc=desc, resume=resume)
        cost = ctx.student_cost(cfg, model)
        robust = suite.evaluate(model, ctx.device, result.precision) \
            if suite is not None else None
    metrics = RunMetrics(
        val_acc=result.val_acc, test_acc=result.test_acc, best_epoch=result.best_epoch,
        epochs_run=result.epochs_run, train_images=len(train_set),
        train_images_per_s=result.images_per_s, params=cost["params"], flops=cost["flops"],
        bytes=cost["bytes"], compression=cost["teacher_params"] / cost["params"],
        seed=cfg.student_train.seed, precision=result.precision,
        eval_s=sum(h.val_seconds for h in result.history) + result.test_s,
        wall_s=time.perf_counter() - t0, robust=robust,
        teacher_steps_cached=result.teacher_steps_cached,
        teacher_steps_computed=result.teacher_steps_computed,
        kernels=bf16_kernels(result.precision, ctx.device), **ig_info)
    return StudentRun(model, result, metrics)
