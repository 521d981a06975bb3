"""Study files -> frozen dataclasses.

A study file (``studies/<name>.toml``) describes data, teacher, student, their training, the
method switches (kd, ig, at), the method's hyperparameters, the search space, and scale
presets (``[scales.smoke]``, ``[scales.cpu]``, ``[scales.paper]``) whose tables override the
base tables. ``inherit = "<study>"`` starts from another study file in the same folder.

Every check runs here, before any work starts: an unknown key, a wrong type or an
out-of-range value raises :class:`KdigError` with one line naming the file, the key, the
value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdig_study import corruptions_ic
from kdig_study.errors import KdigError

SCALES: tuple[str, ...] = ("smoke", "cpu", "paper")
Scale = Literal["smoke", "cpu", "paper"]
# Where the overlay's maps come from (kdig_study.attribution.sources): the teacher's IG maps;
# four controls (IG maps of other images, of other images of the same class, smooth random
# maps with IG's per-map values, one flat map at IG's mean overlay value); and Captum's other
# attribution methods on the same teacher. The Literal is the one definition; the tuple is
# read from it.
MapSource = Literal["ig", "shuffled", "shuffled_same_class", "random", "constant", "saliency",
                    "input_x_gradient", "smoothgrad", "gradient_shap", "gradcam"]
MAP_SOURCES: tuple[str, ...] = typing.get_args(MapSource)
# IG quadrature rules: trapezoid and clenshaw_curtis are ours (nested: 8/16/32/64 share
# points); the rest are Captum's.
IGRule = Literal["trapezoid", "clenshaw_curtis", "gausslegendre", "riemann_middle",
                 "riemann_left", "riemann_right", "riemann_trapezoid"]
IG_RULES: tuple[str, ...] = typing.get_args(IGRule)
NestedRule = Literal["trapezoid", "clenshaw_curtis"]
NESTED_RULES: tuple[str, ...] = typing.get_args(NestedRule)


# The most IG steps per map (ig.steps, ig.adaptive_cap, `attribute --steps`): 4,096 points
# per image already take minutes per thousand images on a GPU.
MAX_IG_STEPS = 4096


def _bounded(default: Any, *, ge: float | None = None, gt: float | None = None,
             le: float | None = None) -> Any:
    """A dataclass field with a numeric range that the loader checks."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


MIN_IMAGE_SIZE = 16  # px; the smallest side the networks' strides and the crops allow
MAX_IMAGE_SIZE = 1024  # px; a whole split is held in memory as uint8
DatasetName = Literal["cifar10", "cifar100", "folder", "synthetic"]


@dataclass(frozen=True)
class DataConfig:
    # cifar10 / cifar100: torchvision's format (cifar-10-batches-py, cifar-100-python) or an
    # image-folder tree; folder: any tree train/<class>/*, test/<class>/* (classes from the
    # folder names); synthetic: generated shapes, for tests
    dataset: DatasetName = "cifar10"
    cifar100_labels: Literal["fine", "coarse"] = "fine"  # CIFAR-100's 100 or 20 classes
    # Data folder or archive; "" means --data-dir, then $KDIG_DATA, then ./data, ../shared/data.
    path: str = ""
    val_size: int = _bounded(5000, ge=10)  # held out of the training set, stratified
    test_size: int = _bounded(0, ge=0)  # 0: the whole test split
    split_seed: int = 0
    normalize: bool = True  # mean/std of the training split, applied after any overlay
    # The square size every image is used at, in px: 0 takes the images' own size (they must
    # all be one square size), else 16 and up. Synthetic data is drawn at it (0: 32).
    image_size: int = _bounded(0, ge=0, le=MAX_IMAGE_SIZE)
    # An image of another size: refuse (one line naming it), stretch (resized to image_size
    # x image_size, the aspect ratio not kept) or center_crop (the shorter side resized to
    # image_size, then the centre cut out); either way the count is said once.
    resize: Literal["refuse", "stretch", "center_crop"] = "refuse"
    pad: int = _bounded(4, ge=0, le=64)  # random-crop padding (4 at 32 px; scale it with size)
    flip: bool = True
    # Synthetic data only: how many images to generate for the training pool and the test set.
    synthetic_train: int = _bounded(2000, ge=20)
    synthetic_test: int = _bounded(500, ge=10)


# The architectures: two families of this project's own, and the CIFAR residual networks of
# the KD literature's tables (mdistiller, RepDistiller), named by depth:
#   resnetD     D = 6n + 2 (8, 14, 20, 32, 44, 56, 110): 16-32-64 channels, n blocks a stage
#   resnetDx4   (resnet8x4, resnet32x4): 64-128-256 channels after a 32-channel stem
#   wrnD_K      D = 6n + 4 (16, 28, 40): pre-activation wide ResNet, widening factor K
# and from elsewhere:
#   torchvision:NAME              a torchvision classifier, never with downloaded weights
#   timm:NAME                     a timm classifier (the `timm` extra), likewise
#   python:package.module:func    your own: func(num_classes=N) returns an nn.Module
ARCH_FORMS = ("mobilenetv2, convnet, resnetD (D = 6n+2: resnet20, resnet56, resnet110), "
              "resnetDx4 (resnet8x4, resnet32x4), wrnD_K (D = 6n+4: wrn16_2, wrn40_2), "
              "torchvision:NAME (e.g. torchvision:resnet18), timm:NAME (e.g. timm:resnet18), "
              "python:package.module:function")
_RESNET = re.compile(r"resnet(\d+)(x4)?")
_WRN = re.compile(r"wrn(\d+)_(\d+)")
_TORCHVISION = re.compile(r"torchvision:(\w+)")
_TIMM = re.compile(r"timm:([\w.\-]+)")
_PYTHON = re.compile(r"python:([A-Za-z_][\w.]*):([A-Za-z_]\w*)")


@dataclass(frozen=True)
class ArchSpec:
    family: Literal["mobilenetv2", "convnet", "resnet", "wrn", "torchvision", "timm", "python"]
    depth: int = 0
    widen: int = 1  # 4 for resnetDx4; K for wrnD_K
    ref: str = ""  # torchvision's model name; "module:function" for python

    @property
    def external(self) -> bool:
        return self.family in ("torchvision", "timm", "python")


def parse_arch(name: str) -> ArchSpec | None:
    """The architecture a name stands for, or None where it names none."""
    if name in ("mobilenetv2", "convnet"):
        return ArchSpec(name)  # type: ignore[arg-type]
    m = _TORCHVISION.fullmatch(name)
    if m:
        return ArchSpec("torchvision", ref=m[1])
    m = _TIMM.fullmatch(name)
    if m:
        return ArchSpec("timm", ref=m[1])
    m = _PYTHON.fullmatch(name)
    if m:
        return ArchSpec("python", ref=f"{m[1]}:{m[2]}")
    m = _RESNET.fullmatch(name)
    if m and int(m[1]) >= 8 and (int(m[1]) - 2) % 6 == 0:
        return ArchSpec("resnet", int(m[1]), 4 if m[2] else 1)
    m = _WRN.fullmatch(name)
    if m and int(m[1]) >= 10 and (int(m[1]) - 4) % 6 == 0 and 1 <= int(m[2]) <= 16:
        return ArchSpec("wrn", int(m[1]), int(m[2]))
    return None


def tap_family(arch: str) -> str:
    """Architectures whose attention-transfer taps have one size: the CIFAR residual
    networks share theirs (the end of the second stage, 16x16)."""
    spec = parse_arch(arch)
    family = spec.family if spec else arch
    return "cifar-resnet" if family in ("resnet", "wrn") else family


def at_pair_problem(teacher: ModelConfig, student: ModelConfig) -> str | None:
    """Why attention transfer cannot pair these two (None: it can): the tapped maps must
    have one size, so one tap family and one style."""
    external = [(role, m) for role, m in (("teacher", teacher), ("student", student))
                if (spec := parse_arch(m.arch)) is not None and spec.external]
    if external:
        missing = [f"{role}.at_layer" for role, m in external if not m.at_layer]
        return None if not missing else (
            f"attention transfer with {external[0][1].arch} taps the layer you name: set "
            f"{' and '.join(missing)} (a module path, e.g. \"layer2\")")
    if (tap_family(teacher.arch), teacher.style) == (tap_family(student.arch), student.style):
        return None
    return (f"attention transfer needs teacher and student of one family and style (the "
            f"tapped maps must have one size); got {teacher.arch}/{teacher.style} and "
            f"{student.arch}/{student.style}")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mobilenetv2"  # ARCH_FORMS
    width: float = _bounded(1.0, gt=0.0, le=4.0)
    # Trailing modules of `features` removed (the paper's student: 5, keeping 13 blocks).
    drop_blocks: int = _bounded(0, ge=0, le=17)
    # teacher only: your own trained teacher (.safetensors, this architecture) instead of
    # training one; "" trains it
    weights: str = ""
    # convnet only: "default", or "airbench": Keller Jordan's network (a frozen 2x2
    # patch-whitening stem, BatchNorm without scale, identity-initialised convolutions, a
    # max-pool head with a scaled bias-free classifier); kdig_study.models
    style: Literal["default", "airbench"] = "default"
    # torchvision:NAME only: a 3x3 stride-1 first convolution and no max-pool, for 32 px
    # images (ResNet-family models: conv1 and maxpool)
    small_input: bool = False
    # the layer Grad-CAM looks at, by module path (e.g. "layer4"); "" : the last block of
    # the built-in families, the last top-level module with a feature map otherwise
    cam_layer: str = ""
    # torchvision: and python: architectures: the layer attention transfer taps, by module
    # path (e.g. "layer2"); the teacher's and the student's maps there must have one size
    at_layer: str = ""


@dataclass(frozen=True)
class TrainConfig:
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = _bounded(1e-3, gt=0.0, le=10.0)
    weight_decay: float = _bounded(0.0, ge=0.0)
    momentum: float = _bounded(0.9, ge=0.0, le=1.0)
    # learning rate multiplier of BatchNorm biases (their weight decay is divided by it, so
    # the decay per step stays): airbench trains them 64x faster
    bias_lr_scale: float = _bounded(1.0, gt=0.0, le=1000.0)
    # triangle: airbench's, linear from 0.2 x lr up to lr at 23% of the steps, then down to
    # 0.07 x lr
    schedule: Literal["constant", "onecycle", "cosine", "triangle"] = "constant"
    epochs: int = _bounded(100, ge=1)
    batch_size: int = _bounded(64, ge=1)
    label_smoothing: float = _bounded(0.0, ge=0.0, le=1.0)
    # 0: the whole training split; else a stratified subset of that many images.
    train_size: int = _bounded(0, ge=0)
    # random-crop padding of this role's training (-1: data.pad); e.g. a short teacher
    # schedule learns more from translations of 2 px than of 4
    pad: int = _bounded(-1, ge=-1, le=64)
    seed: int = 0
    # auto: bfloat16 autocast where the hardware runs it fast (CUDA; CPUs with AMX or
    # AVX512-BF16), else fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile the training forward passes (student, and a KD teacher); `bench --only
    # compile` measures what it buys on this machine
    compile: bool = False
    # airbench's lookahead averaging: from `ema_start` (fraction of training) on, every 5
    # steps the weights move to an exponential average of themselves whose decay rises
    # towards the end; the averaged weights are what is evaluated
    ema: bool = False
    ema_start: float = _bounded(0.3, ge=0.0, le=1.0)

KDMethod = Literal["hinton", "dkd", "dist", "lskd"]
KD_METHODS: tuple[str, ...] = typing.get_args(KDMethod)
# A KD method as a level of the ablation's kd factor (--factors kd=none|hinton|dkd), named
# in conditions ("DKD+IG"); the plain kd level ("KD") is the study file's own method.
KD_METHOD_NAMES: dict[str, str] = {"hinton": "Hinton", "dkd": "DKD", "dist": "DIST",
                                   "lskd": "LSKD"}
_NAMED = {"kd": "KD", "ig": "IG", "at": "AT"} | KD_METHOD_NAMES


def kd_level(levels: Iterable[str]) -> str | None:
    """A condition's level of the kd factor: "kd" (the study file's method), a KD method,
    or None (no distillation)."""
    return next((t for t in levels if t == "kd" or t in KD_METHODS), None)


def condition_name(levels: Iterable[str]) -> str:
    """The one name of a method condition, from its switched-on levels: KD (or the KD
    method), then the overlay's map source(s), then AT, joined by '+'; kd, ig and at in
    capitals, KD methods by their names, other map sources as named ("KD+shuffled",
    "DKD+IG"); "student" when none is on (the student alone)."""
    on = set(levels)
    kd = kd_level(on)
    order = ([kd] if kd else []) + sorted(on - {kd, "at"}) + [t for t in ("at",) if t in on]
    return "+".join(_NAMED.get(t, t) for t in order) or "student"


def method_name(method: MethodConfig | Mapping[str, Any]) -> str:
    """The condition name of a study's method switches (a config, or its stored dict)."""
    get = method.get if isinstance(method, Mapping) else lambda k: getattr(method, k)
    return condition_name(k for k in ("kd", "ig", "at") if get(k))


@dataclass(frozen=True)
class MethodConfig:
    kd: bool = True
    ig: bool = True
    at: bool = False




@dataclass(frozen=True)
class KDConfig:
    """The distillation loss: ``method`` and its parameters, and the weights of its term
    and of cross-entropy, in one of two forms: ``alpha`` (the paper's: alpha on the KD term,
    1 - alpha on CE; torchdistill puts alpha on CE instead) or ``ce_weight`` and
    ``kd_weight`` (separate weights, mdistiller's form). A study gives one form: both in
    one table is refused (a config ported from either framework must not flip silently)."""

    # hinton: T^2 KL (Hinton et al.); dkd: decoupled TCKD/NCKD (Zhao et al. 2022); dist:
    # Pearson relations (Huang et al. 2022); lskd: hinton on z-scored logits (Sun et al. 2024)
    method: KDMethod = "hinton"
    temperature: float = _bounded(2.5, gt=0.0, le=100.0)
    # weight of the KD term (docs/design.md, section 3: the paper's convention, not torchdistill's)
    alpha: float = _bounded(0.01, ge=0.0, le=1.0)
    ce_weight: float = _bounded(-1.0, ge=-1.0)  # -1: not given (alpha's form)
    kd_weight: float = _bounded(-1.0, ge=-1.0)
    dkd_alpha: float = _bounded(1.0, ge=0.0)  # TCKD's weight (mdistiller's CIFAR default)
    dkd_beta: float = _bounded(8.0, ge=0.0)  # NCKD's weight
    dkd_warmup: int = _bounded(20, ge=0)  # epochs over which the DKD term rises linearly
    dist_beta: float = _bounded(1.0, ge=0.0)  # inter-class relation's weight
    dist_gamma: float = _bounded(1.0, ge=0.0)  # intra-class relation's weight

    @property
    def weights(self) -> tuple[float, float]:
        """(CE weight, KD term weight)."""
        if self.kd_weight >= 0:
            return self.ce_weight, self.kd_weight
        return 1.0 - self.alpha, self.alpha


@dataclass(frozen=True)
class ATConfig:
    weight: float = _bounded(0.8, ge=0.0)


@dataclass(frozen=True)
class IGConfig:
    steps: int = _bounded(50, ge=1, le=MAX_IG_STEPS)
    # trapezoid, clenshaw_curtis: ours, nested (8/16/32/64 share points); the rest are
    # Captum's rules
    method: IGRule = "gausslegendre"
    baseline: Literal["zeros", "black", "blur"] = "zeros"
    reduce: Literal["abs_sum", "sum_abs", "l2"] = "abs_sum"
    batch_size: int = _bounded(64, ge=1)  # images per IG chunk (and per resumable step)
    internal_batch: int = _bounded(128, ge=1)  # points x images per forward/backward pass
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_gap: float = _bounded(0.05, gt=0.0)  # bound on the median relative completeness gap
    # Adaptive mode (kdig_study.attribution.adaptive), when target_gap > 0: every image
    # starts with `adaptive_start` intervals of the nested `adaptive_rule` and is refined
    # (doubling) until its completeness gap is <= target_gap or it reaches `adaptive_cap`
    # intervals. One map per image; `steps` and the search's ig_steps then have no effect.
    target_gap: float = _bounded(0.0, ge=0.0, le=1.0)
    adaptive_rule: NestedRule = "clenshaw_curtis"
    adaptive_start: int = _bounded(4, ge=1, le=1024)
    adaptive_cap: int = _bounded(128, ge=1, le=MAX_IG_STEPS)
    overlay_prob: float = _bounded(0.1, ge=0.0, le=1.0)
    overlay_strength: float = _bounded(0.5, ge=0.0, le=1.0)  # lam in x' = (1-lam) x + lam M
    exponent_low: float = _bounded(1.0, gt=0.0)
    exponent_high: float = _bounded(2.0, gt=0.0)
    # The overlay's maps: one of MAP_SOURCES. shuffled and random are derived from the IG
    # maps of `steps`; the Captum sources ignore `steps`.
    source: MapSource = "ig"
    source_seed: int = 0  # derangement (shuffled), noise (random, smoothgrad, gradient_shap)
    smoothgrad_samples: int = _bounded(16, ge=1, le=1024)  # noisy copies per image
    smoothgrad_sigma: float = _bounded(0.5, gt=0.0)  # noise sd in the normalised input space
    shap_samples: int = _bounded(16, ge=1, le=1024)  # GradientShap's random path points


CORRUPTIONS: tuple[str, ...] = ("jpeg", "gaussian_noise", "gaussian_blur", "contrast",
                                "brightness")
OBJECTIVES: tuple[str, ...] = ("val_acc", "robust_val_acc")


@dataclass(frozen=True)
class AnalysisConfig:
    """The ablation's analysis, declared before it runs (recorded on the ablation study; a
    resumed ablation with other values is refused): the ``primary`` comparison ("A - B",
    condition names) on ``metric``; every comparison and effect is judged at family-wise
    level ``alpha`` (Holm) and called equivalent only by a two one-sided tests procedure
    within +-``equivalence_margin`` accuracy points. Not part of the config fingerprint: it
    changes no run, only how runs are judged."""

    primary: str = "KD+IG - KD"
    metric: Literal["test_acc", "robust_test_acc", "val_acc"] = "test_acc"
    alpha: float = _bounded(0.05, gt=0.0, le=0.2)
    equivalence_margin: float = _bounded(0.4, gt=0.0, le=50.0)  # accuracy points


@dataclass(frozen=True)
class RobustnessConfig:
    """The corruption suite every run is evaluated on (kdig_study.corruptions)."""

    enabled: bool = True
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3)  # 0 would be the clean image
    test_per_setting: int = _bounded(300, ge=0)  # test images per (corruption, severity); 0: all
    val_per_setting: int = _bounded(130, ge=0)
    seed: int = 0


@dataclass(frozen=True)
class ExpectedConfig:
    """Measured wall times, in minutes, for the banner's estimate (0: not measured). Not part
    of the config fingerprint: they describe a machine, not a result."""

    teacher: float = _bounded(0.0, ge=0.0)  # training the teacher
    maps: float = _bounded(0.0, ge=0.0)  # every map store `optimize` computes up front
    trial: float = _bounded(0.0, ge=0.0)  # one search trial, pruned ones included (mean)
    # the same, reading the teacher's outputs from the teacher-output cache (0: as `trial`)
    trial_cached: float = _bounded(0.0, ge=0.0)
    machine: str = "a 2-core CPU"  # where they were measured


@dataclass(frozen=True)
class MeasureConfig:
    """How a run's latency is measured (kdig_study.measure): warm-up passes, then timed
    passes, at batch 1 and the training batch. Not part of the config fingerprint: it
    describes a measurement, not a result (smoke runs time fewer passes)."""

    latency_warmup: int = _bounded(10, ge=0)
    latency_runs: int = _bounded(50, ge=5)


@dataclass(frozen=True)
class TeacherCacheConfig:
    """The teacher-output cache (kdig_study.teacher_outputs): KD and AT runs of one data
    stream read the teacher's logits and attention maps that the stream's first run wrote.
    Not part of the config fingerprint: a run that reads it gets the bits it would have
    computed. ``max_mb``: a stream whose epochs would need more is not kept (one line says
    so), e.g. attention maps at paper scale."""

    enabled: bool = True
    max_mb: float = _bounded(4096.0, gt=0.0)


@dataclass(frozen=True)
class CheckpointConfig:
    """Mid-run checkpoints (kdig_study.checkpoint) of the teacher, trials and ablation runs:
    written at the end of every ``every_epochs``-th epoch, or, with ``every_minutes`` > 0,
    at the end of the first epoch that many minutes after the last write; an interrupted
    run goes on from its last one. Not part of the config fingerprint: a resumed run ends
    with the bits it would have had uninterrupted."""

    enabled: bool = True
    every_epochs: int = _bounded(1, ge=1)
    every_minutes: float = _bounded(0.0, ge=0.0)


@dataclass(frozen=True)
class ParamSpec:
    """One search dimension: a float/int range (optionally log) or a list of choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[float | str, ...] = ()  # numbers, or map sources for `source`


@dataclass(frozen=True)
class SearchConfig:
    n_trials: int = _bounded(20, ge=1)
    timeout: float = _bounded(0.0, ge=0.0)  # seconds; 0 means none
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    # median pruner: epochs before any pruning (0: a quarter of the epochs), and the
    # percentile a trial must stay above (50: the median); set from `python -m
    # kdig_study.pruning` on an unpruned search
    prune_warmup: int = _bounded(0, ge=0)
    prune_percentile: float = _bounded(50.0, gt=0.0, le=100.0)
    seed: int = 0
    # ["val_acc"], or ["val_acc", "robust_val_acc"] for a multi-objective study
    objectives: tuple[str, ...] = ("val_acc",)
    space: dict[str, ParamSpec] = field(default_factory=dict)
    # parameters of the space held at the study's own settings, not searched: what an
    # ablation's per-condition tuning sets for the factors a condition fixes (its KD
    # method, its map source)
    hold: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchParam:
    """A searchable hyperparameter: the study-file field it sets, and when a run uses it."""

    section: str  # a StudyConfig section: kd, ig, at, student_train
    key: str  # the field of that section
    used: Callable[[StudyConfig], bool]  # whether the study's method switches use it


# The one table of search parameters: the search space's names, their range checks, the
# --params file's keys, which parameters a study searches, how a trial's values reach the
# run's config (apply_params) and what an ablation records (param_values) all derive from it.
SEARCH_PARAMETERS: dict[str, SearchParam] = {
    "temperature": SearchParam("kd", "temperature", lambda c: c.method.kd),
    "alpha": SearchParam("kd", "alpha", lambda c: c.method.kd),
    "overlay_strength": SearchParam("ig", "overlay_strength", lambda c: c.method.ig),
    "overlay_prob": SearchParam("ig", "overlay_prob", lambda c: c.method.ig),
    # adaptive IG has one map per image: the step count changes nothing
    "ig_steps": SearchParam("ig", "steps", lambda c: c.method.ig and not c.ig.target_gap),
    "lr": SearchParam("student_train", "lr", lambda c: True),
    "at_weight": SearchParam("at", "weight", lambda c: c.method.at),
    "source": SearchParam("ig", "source", lambda c: c.method.ig),
    # the KD method as a categorical, and each method's own parameters, used only where the
    # trial's method is theirs (define-by-run: suggested after kd_method)
    "kd_method": SearchParam("kd", "method", lambda c: c.method.kd),
    "dkd_alpha": SearchParam("kd", "dkd_alpha", lambda c: c.method.kd and c.kd.method == "dkd"),
    "dkd_beta": SearchParam("kd", "dkd_beta", lambda c: c.method.kd and c.kd.method == "dkd"),
    "dist_beta": SearchParam("kd", "dist_beta", lambda c: c.method.kd and c.kd.method == "dist"),
    "dist_gamma": SearchParam("kd", "dist_gamma",
                              lambda c: c.method.kd and c.kd.method == "dist"),
}
# search parameters whose choices are names, and the names allowed
_NAMED_CHOICES = {"source": ("map sources", MAP_SOURCES),
                  "kd_method": ("KD methods", KD_METHODS)}
SEARCH_PARAMS: tuple[str, ...] = tuple(SEARCH_PARAMETERS)

# The ablation's factors (kdig_study.ablation, kdig_study.stats): the on/off ones --factors
# names, each with its levels, the reference (off: None) first; ``ig`` is the overlay factor
# at levels none|ig (its other levels are map sources). A compression sweep varies one of
# SWEEP_KEYS, a setting of the student.
BINARY_FACTORS: dict[str, tuple[str | None, ...]] = {"kd": (None, "kd"), "ig": (None, "ig"),
                                                     "at": (None, "at")}
FACTORS: tuple[str, ...] = tuple(BINARY_FACTORS)
SWEEP_KEYS: tuple[str, ...] = ("drop_blocks", "width")
# Any of these study keys may be swept too (`--sweep SECTION.KEY=V1,V2,...`: a dose-response
# ablation): what one run of a student changes. Not the data, the teacher or its maps'
# method (one context serves every run of an ablation: sweeping those would silently keep
# the first), nor the training subset (the maps are made for it) or the seed (replicates).
SWEEPABLE: dict[str, tuple[str, ...]] = {
    "student": ("width", "drop_blocks"),
    "student_train": ("epochs", "lr", "weight_decay", "label_smoothing", "batch_size"),
    "kd": ("temperature", "alpha"),
    "at": ("weight",),
    "ig": ("overlay_strength", "overlay_prob", "exponent_low", "exponent_high", "steps"),
}


# every name `--sweep` takes: the student's compression keys, then SECTION.KEY
SWEEP_NAMES: tuple[str, ...] = (*SWEEP_KEYS,
                                *(f"{s}.{k}" for s, ks in SWEEPABLE.items() for k in ks))


def with_setting(cfg: StudyConfig, key: str, value: Any, src: str) -> StudyConfig:
    """``cfg`` with one SWEEPABLE key (``section.key``) set, checked like a study file's
    value (type, range, the checks across fields): one line naming ``src`` otherwise."""
    section, _, name = key.partition(".")
    if name not in SWEEPABLE.get(section, ()):
        allowed = ", ".join(f"{s}.{k}" for s, ks in SWEEPABLE.items() for k in ks)
        raise KdigError(f"{src}: {key!r} cannot be swept; allowed: {allowed}")
    current = getattr(cfg, section)
    if typing.get_type_hints(type(current))[name] is int and isinstance(value, float) and \
            value.is_integer():  # a sweep's values are read as numbers: 4.0 is the epochs 4
        value = int(value)
    if key == "kd.alpha" and cfg.kd.kd_weight >= 0:
        raise KdigError(f"{src}: kd.alpha is not used here: this study gives its weights as "
                        f"kd.ce_weight and kd.kd_weight")
    checked = getattr(_build(_SECTIONS[section], {name: value}, src, section), name)
    out = dataclasses.replace(cfg, **{section: dataclasses.replace(current, **{name: checked})})
    _check_study(out)
    return out

# The deployment table (kdig_study.deploy, kdig_study.deploy_measure, `export`): the int8
# model's activation types, and the batch sizes every latency row is timed at.
INT8_ACTIVATIONS: tuple[str, ...] = ("uint8", "int8")
DEPLOY_BATCHES: tuple[int, ...] = (1, 128)


def default_int8_activations() -> str:
    """The activation type of onnxruntime's fast int8 kernels on this machine. On x86-64
    its convolutions multiply uint8 activations by int8 weights (U8S8: VPMADDUBSW / VNNI);
    int8 activations (S8S8) take a slower path there: the cpu-scale student's int8 model ran
    batch 128 in 146 ms with S8S8 against 40 ms with U8S8 (ORT fp32: 49 ms) on a 2-core AMD
    EPYC with AVX512-VNNI (docs/results.md). On Arm, S8S8 is onnxruntime's recommended
    format."""
    machine = platform.machine().lower()
    return "uint8" if machine in ("x86_64", "amd64", "i686", "x86") else "int8"


@dataclass(frozen=True)
class StudyConfig:
    name: str
    source: str  # the study file, for messages
    scale: Scale
    description: str = ""
    data: DataConfig = DataConfig()
    teacher: ModelConfig = ModelConfig()
    student: ModelConfig = ModelConfig(drop_blocks=5)
    teacher_train: TrainConfig = TrainConfig()
    student_train: TrainConfig = TrainConfig()
    method: MethodConfig = MethodConfig()
    kd: KDConfig = KDConfig()
    at: ATConfig = ATConfig()
    ig: IGConfig = IGConfig()
    search: SearchConfig = SearchConfig()
    robustness: RobustnessConfig = RobustnessConfig()
    expected: ExpectedConfig = ExpectedConfig()
    measure: MeasureConfig = MeasureConfig()
    teacher_cache: TeacherCacheConfig = TeacherCacheConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    overrides: tuple[str, ...] = ()  # the --set items applied (their values are in the fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not the file's path or description)."""
        return _hash(identity(self.to_dict()))


# What a config's results do not depend on: its file and description, how it is measured,
# its caches and checkpoints, the --set items (their values are in the fields), where the
# data was found (the same data elsewhere is the same data), and how long a search runs.
_NOT_IDENTITY = ("source", "description", "expected", "measure", "teacher_cache",
                 "checkpoint", "analysis", "overrides")
_NOT_IDENTITY_KEYS = {"data": ("path",), "search": ("n_trials", "timeout")}


# Keys added after studies were made, per section, with their defaults: at their defaults
# they are what those studies ran, so they are left out of the identity and those studies
# keep theirs.
_LATER_DEFAULTS: dict[str, dict[str, Any]] = {
    "kd": {"method": "hinton", "ce_weight": -1.0, "kd_weight": -1.0, "dkd_alpha": 1.0,
           "dkd_beta": 8.0, "dkd_warmup": 20, "dist_beta": 1.0, "dist_gamma": 1.0},
    "search": {"hold": []},
    "data": {"cifar100_labels": "fine", "image_size": 0, "resize": "refuse"},
    "teacher": {"small_input": False, "cam_layer": "", "at_layer": ""},
    "student": {"small_input": False, "cam_layer": "", "at_layer": ""}}


def _drop_later_defaults(section: str, part: dict[str, Any]) -> dict[str, Any]:
    """``part`` (a section's dict) without the keys added later that are at their default."""
    for k, default in _LATER_DEFAULTS.get(section, {}).items():
        if k in part and part[k] == default:
            part.pop(k)
    return part


def model_identity(m: ModelConfig) -> dict[str, Any]:
    """A model config as fingerprints hash it: keys added later left out at their
    defaults (the teachers cached before them keep their fingerprints)."""
    return _drop_later_defaults("teacher", dataclasses.asdict(m))


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config dict (``StudyConfig.to_dict()``, or one stored as JSON) that
    results depend on, in JSON's types (tuples as lists): what the fingerprint hashes and a
    changed-config refusal compares."""
    d = json.loads(json.dumps(config, default=str))
    for k in _NOT_IDENTITY:
        d.pop(k, None)
    for section, keys in _NOT_IDENTITY_KEYS.items():
        for k in keys:
            d.get(section, {}).pop(k, None)
    for section in _LATER_DEFAULTS:
        _drop_later_defaults(section, d.get(section, {}))
    return d


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "teacher": ModelConfig,
    "student": ModelConfig,
    "teacher_train": TrainConfig,
    "student_train": TrainConfig,
    "method": MethodConfig,
    "kd": KDConfig,
    "at": ATConfig,
    "ig": IGConfig,
    "search": SearchConfig,
    "robustness": RobustnessConfig,
    "expected": ExpectedConfig,
    "measure": MeasureConfig,
    "teacher_cache": TeacherCacheConfig,
    "checkpoint": CheckpointConfig,
    "analysis": AnalysisConfig,
}
_TOP_KEYS = ("inherit", "description", "scales")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def studies_dir() -> Path:
    """$KDIG_STUDIES, else ./studies, else the studies/ folder beside the package."""
    env = os.environ.get("KDIG_STUDIES")
    if env:
        return Path(env)
    local = Path("studies")
    if local.is_dir():
        return local
    return Path(__file__).resolve().parent.parent / "studies"


def condition_study(name: str) -> str | None:
    """The study file whose search tunes condition ``name`` (--params per-condition): the
    name in lower case with '+' as '_' (student, kd, ig, kd_ig), where that file exists."""
    stem = name.lower().replace("+", "_")
    return stem if (studies_dir() / f"{stem}.toml").is_file() else None


def study_path(study: str) -> Path:
    """A study name (``kd_ig``) or a path to a .toml file."""
    if study.endswith(".toml") or os.sep in study:
        path = Path(study)
    else:
        path = studies_dir() / f"{study}.toml"
    if not path.is_file():
        folder = path.parent
        known = sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []
        raise KdigError(f"unknown study '{study}': no file {path}"
                        + (f"; known studies: {', '.join(known)}" if known else ""))
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise KdigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise KdigError(f"{path}: not valid UTF-8 text (byte {e.start}); a study file is "
                        f"TOML in UTF-8") from None
    except OSError as e:
        raise KdigError(f"{path}: cannot be read: {e.strerror or e}") from None


_KD_FORMS = (("alpha",), ("ce_weight", "kd_weight"))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k == "kd" and isinstance(v, dict) and isinstance(out.get(k), dict):
            # a later layer (a scale preset, an inheriting file, --set) that gives the KD
            # weights in one form replaces the other form of the layer below
            for form, other in (_KD_FORMS, _KD_FORMS[::-1]):
                if any(x in v for x in form):
                    out[k] = {x: y for x, y in out[k].items() if x not in other}
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _raw_table(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    table = _read_toml(path)
    parent = table.pop("inherit", None)
    if parent is None:
        return table
    if not isinstance(parent, str):
        raise KdigError(f"{path}: inherit = {parent!r}: must be a study name (a string)")
    parent_path = path.parent / f"{parent}.toml"
    if not parent_path.is_file():
        raise KdigError(f"{path}: inherit = {parent!r}: no file {parent_path}")
    if parent_path.resolve() in seen:
        raise KdigError(f"{path}: inherit = {parent!r}: inheritance loop")
    return _merge(_raw_table(parent_path, seen + (path.resolve(),)), table)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["kd.alpha=0.5", "student_train.epochs=2"]`` -> a nested table, each checked like
    the study file (one line naming the key, the value and what is allowed).

    A value is read as a TOML value (numbers, true/false, "strings", [lists]); a bare word
    that is not valid TOML is taken as a string (``--set ig.method=trapezoid``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        parts = [k.strip() for k in key.split(".")]
        if not eq or len(parts) < 2 or not all(parts):
            raise KdigError(f"--set {item}: expected SECTION.KEY=VALUE, e.g. "
                            f"--set student_train.epochs=2; sections: {', '.join(_SECTIONS)}")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        section = parts[0]
        if section not in _SECTIONS:
            raise KdigError(f"--set {item}: unknown section '{section}'; allowed: "
                            f"{', '.join(_SECTIONS)}")
        if len(parts) == 2 and parts[1] != "space":
            # checked on its own first, so the error names --set, not the study file
            _build(_SECTIONS[section], {parts[1]: value}, "--set", section)
        node = out
        for k in parts[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise KdigError(f"--set {item}: '{k}' is set twice, as a value and a table")
        node[parts[-1]] = value
    return out


def load_study(study: str, scale: str, overrides: list[str] | tuple[str, ...] = ()
               ) -> StudyConfig:
    """Load ``studies/<study>.toml`` (or a path) at a scale preset, fully validated, with
    ``--set SECTION.KEY=VALUE`` overrides applied last (recorded in the config)."""
    over = parse_overrides(overrides)
    path = study_path(study)
    if scale not in SCALES:
        raise KdigError(f"unknown scale '{scale}'; allowed: {', '.join(SCALES)}")
    table = _raw_table(path)
    src = str(path)
    for key in table:
        if key not in _SECTIONS and key not in _TOP_KEYS:
            allowed = ", ".join(list(_SECTIONS) + list(_TOP_KEYS))
            raise KdigError(f"{src}: unknown key '{key}'; allowed: {allowed}")
    scales = table.pop("scales", {})
    if not isinstance(scales, dict):
        raise KdigError(f"{src}: [scales] must be a table of presets ({', '.join(SCALES)})")
    for name in scales:
        if name not in SCALES:
            raise KdigError(f"{src}: unknown scale preset [scales.{name}]; "
                            f"allowed: {', '.join(SCALES)}")
    # Check the base tables first so an error names the table it is written in.
    _build_study(table, path.stem, src, "paper", where="")
    preset = scales.get(scale, {})
    for key in preset:
        if key not in _SECTIONS and key != "description":
            raise KdigError(f"{src}: unknown key 'scales.{scale}.{key}'; "
                            f"allowed: {', '.join(_SECTIONS)}, description")
    merged = _merge(table, preset)
    if not over:
        return _build_study(merged, path.stem, src, scale, where=f"scales.{scale}.",
                            overridden=preset)
    _build_study(merged, path.stem, src, scale, where=f"scales.{scale}.", overridden=preset)
    cfg = _build_study(_merge(merged, over), path.stem, f"{src} with --set", scale,
                       where="", overridden=over)
    return dataclasses.replace(cfg, overrides=tuple(overrides))


def _build_study(table: dict[str, Any], name: str, src: str, scale: str, where: str,
                 overridden: dict[str, Any] | None = None) -> StudyConfig:
    sections: dict[str, Any] = {}
    for key, cls in _SECTIONS.items():
        sub = table.get(key, {})
        prefix = where if overridden is not None and key in overridden else ""
        if not isinstance(sub, dict):
            raise KdigError(f"{src}: '{prefix}{key}' must be a table [{key}], got {sub!r}")
        sections[key] = _build(cls, sub, src, f"{prefix}{key}")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise KdigError(f"{src}: description = {description!r}: must be a string")
    cfg = StudyConfig(name=name, source=src, scale=scale,  # type: ignore[arg-type]
                      description=description, **sections)
    _check_study(cfg)
    return cfg


def _check_study(cfg: StudyConfig) -> None:
    """Checks that span several fields."""
    if (cfg.kd.ce_weight >= 0) != (cfg.kd.kd_weight >= 0):
        given = "ce_weight" if cfg.kd.ce_weight >= 0 else "kd_weight"
        raise KdigError(f"{cfg.source}: kd.{given} without its pair: give kd.ce_weight and "
                        f"kd.kd_weight together (or kd.alpha alone)")
    if cfg.kd.kd_weight >= 0 and "alpha" in cfg.search.space:
        raise KdigError(f"{cfg.source}: search.space.alpha searches the alpha form of the KD "
                        f"weights, but kd.ce_weight and kd.kd_weight are given: use a study "
                        f"file without [search.space.alpha] for explicit weights, or kd.alpha")
    src = cfg.source
    d = cfg.data
    if 0 < d.image_size < MIN_IMAGE_SIZE:
        raise KdigError(f"{src}: data.image_size = {d.image_size}: allowed 0 (the images' own "
                        f"size) or {MIN_IMAGE_SIZE} and up")
    if d.resize != "refuse" and not d.image_size:
        raise KdigError(f"{src}: data.resize = {d.resize!r} needs data.image_size (the size "
                        f"to resize to), e.g. data.image_size = 64")
    if cfg.ig.target_gap and cfg.ig.adaptive_cap < cfg.ig.adaptive_start:
        raise KdigError(f"{src}: ig.adaptive_cap = {cfg.ig.adaptive_cap} is below "
                        f"ig.adaptive_start = {cfg.ig.adaptive_start}; allowed: cap >= start")
    if cfg.ig.exponent_low > cfg.ig.exponent_high:
        raise KdigError(f"{src}: ig.exponent_low = {cfg.ig.exponent_low} is above "
                        f"ig.exponent_high = {cfg.ig.exponent_high}; allowed: low <= high")
    if cfg.student.weights:
        raise KdigError(f"{src}: student.weights = {cfg.student.weights!r}: students are "
                        f"trained by the study; allowed: \"\" (teacher.weights takes a file)")
    for role in ("teacher", "student"):
        m: ModelConfig = getattr(cfg, role)
        spec = parse_arch(m.arch)
        if spec is None:
            raise KdigError(f"{src}: {role}.arch = {m.arch!r}: no such architecture; allowed: "
                            f"{ARCH_FORMS}")
        if m.at_layer and not spec.external:
            raise KdigError(f"{src}: {role}.at_layer = {m.at_layer!r}: {m.arch} has its own "
                            f"tap; allowed: \"\" (at_layer names the layer of a torchvision: "
                            f"or python: architecture)")
        if m.small_input and spec.family != "torchvision":
            raise KdigError(f"{src}: {role}.small_input = true: only torchvision:NAME models "
                            f"are adapted (the built-in ones have CIFAR stems); allowed: false")
        if spec.external and m.width != 1.0:
            raise KdigError(f"{src}: {role}.width = {m.width}: {m.arch} is built as it is "
                            f"defined (set its width there); allowed: 1.0")
        if m.arch != "convnet" and m.style != "default":
            raise KdigError(f"{src}: {role}.style = {m.style!r}: only the convnet family has "
                            f"the airbench style; allowed: \"default\"")
        if m.arch != "mobilenetv2" and m.drop_blocks:
            raise KdigError(f"{src}: {role}.drop_blocks = {m.drop_blocks}: only MobileNetV2 "
                            f"is compressed by dropping blocks ({m.arch}: by width or "
                            f"depth); allowed: 0")
    r = cfg.robustness
    for name in r.corruptions:
        if corruptions_ic.is_ic(name):  # ImageNet-C's, from an optional package
            if 0 < cfg.data.image_size < corruptions_ic.MIN_SIZE:
                raise KdigError(f"{src}: robustness.corruptions: {name} needs images of "
                                f"{corruptions_ic.MIN_SIZE} px or more; data.image_size = "
                                f"{cfg.data.image_size}: leave the ic_ corruptions out")
            try:
                corruptions_ic.check(name)
            except KdigError as e:
                raise KdigError(f"{src}: {e}") from None
        elif name not in CORRUPTIONS:
            raise KdigError(f"{src}: robustness.corruptions: unknown corruption {name!r}; "
                            f"allowed: {', '.join(CORRUPTIONS)}, or ic_NAME (ImageNet-C's, "
                            f"the corruptions extra)")
    for sev in r.severities:
        if sev not in (0, 1, 2, 3):
            raise KdigError(f"{src}: robustness.severities: {sev!r} is not a severity; "
                            f"allowed: 0 (clean), 1, 2, 3")
    if r.enabled and (not r.corruptions or not r.severities):
        raise KdigError(f"{src}: robustness: needs at least one corruption and one severity "
                        f"(or enabled = false)")
    objectives = cfg.search.objectives
    if not objectives or any(o not in OBJECTIVES for o in objectives) or \
            len(set(objectives)) != len(objectives) or objectives[0] != "val_acc":
        raise KdigError(f"{src}: search.objectives = {list(objectives)}; allowed: "
                        f"[\"val_acc\"] or [\"val_acc\", \"robust_val_acc\"]")
    bad_hold = [h for h in cfg.search.hold if h not in SEARCH_PARAMETERS]
    if bad_hold:
        raise KdigError(f"{src}: search.hold: unknown search parameter(s) "
                        f"{', '.join(map(repr, bad_hold))}; allowed: {', '.join(SEARCH_PARAMS)}")
    if "robust_val_acc" in objectives and not r.enabled:
        raise KdigError(f"{src}: search.objectives has robust_val_acc but robustness.enabled "
                        f"= false; allowed: enable the corruption suite")
    problem = at_pair_problem(cfg.teacher, cfg.student) if cfg.method.at else None
    if problem:
        raise KdigError(f"{src}: method.at = true: {problem}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        return "a list of numbers"
    return {bool: "true or false", int: "an integer", float: "a number (finite)",
            str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    """(ok, converted value) for one TOML value against a field type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            ok, v = _coerce(arg, value)
            if ok:
                return True, v
        return False, value
    if origin is tuple:
        if not isinstance(value, list):
            return False, value
        items = [_coerce(typing.get_args(tp)[0], v) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        # TOML has nan and inf: a NaN passes every range check (all comparisons are false)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and \
            math.isfinite(value)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return False, value


def _check_range(f: dataclasses.Field[Any], value: Any) -> str | None:
    m = f.metadata
    if not m or isinstance(value, bool):
        return None
    if m.get("ge") is not None and value < m["ge"]:
        return f">= {m['ge']:g}" + (f" and <= {m['le']:g}" if m.get("le") is not None else "")
    if m.get("gt") is not None and value <= m["gt"]:
        return f"> {m['gt']:g}" + (f" and <= {m['le']:g}" if m.get("le") is not None else "")
    if m.get("le") is not None and value > m["le"]:
        low = m.get("ge") if m.get("ge") is not None else m.get("gt")
        op = ">=" if m.get("ge") is not None else ">"
        return (f"{op} {low:g} and " if low is not None else "") + f"<= {m['le']:g}"
    return None


def _build(cls: type, table: dict[str, Any], src: str, where: str) -> Any:
    if cls is KDConfig:
        _check_kd_weights(table, src, where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise KdigError(f"{src}: unknown key '{where}.{key}'; allowed: {', '.join(fields)}")
        tp = hints[key]
        if cls is SearchConfig and key == "space":
            kwargs[key] = _build_space(value, src, f"{where}.space")
            continue
        ok, converted = _coerce(tp, value)
        if not ok:
            raise KdigError(f"{src}: {where}.{key} = {value!r}: wrong type; "
                            f"allowed: {_type_name(tp)}")
        allowed = _check_range(fields[key], converted)
        if allowed is not None:
            raise KdigError(f"{src}: {where}.{key} = {value!r}: out of range; "
                            f"allowed: {allowed}")
        kwargs[key] = converted
    return cls(**kwargs)


def _check_kd_weights(table: dict[str, Any], src: str, where: str) -> None:
    """One weights form per table (a study file's, a preset's, --set's): alpha, or ce_weight
    with kd_weight. A later layer's form replaces an earlier's (``_merge``)."""
    explicit = [k for k in ("ce_weight", "kd_weight") if k in table]
    if explicit and "alpha" in table:
        raise KdigError(f"{src}: {where}.alpha and {where}.{explicit[0]} are two weight "
                        f"conventions (alpha: KD alpha, CE 1 - alpha, the paper's; ce_weight "
                        f"and kd_weight: separate, mdistiller's); give one")


def _param_field(name: str) -> tuple[dataclasses.Field[Any], Any]:
    """The config field a search parameter sets, and its type (for checks)."""
    p = SEARCH_PARAMETERS[name]
    cls = _SECTIONS[p.section]
    return (next(f for f in dataclasses.fields(cls) if f.name == p.key),
            typing.get_type_hints(cls)[p.key])


def apply_params(cfg: StudyConfig, params: Mapping[str, Any]) -> StudyConfig:
    """The study config with one trial's (or a --params file's) parameters filled in.

    Every name goes through SEARCH_PARAMETERS, so no parameter can be recorded without
    reaching the run; an unknown name is refused."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in params.items():
        if name not in SEARCH_PARAMETERS:
            raise KdigError(f"unknown search parameter {name!r}; allowed: "
                            f"{', '.join(SEARCH_PARAMS)}")
        p = SEARCH_PARAMETERS[name]
        tp = _param_field(name)[1]
        sections.setdefault(p.section, {})[p.key] = int(value) if tp is int else \
            float(value) if tp is float else value
    return dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec), **kv)
                                       for sec, kv in sections.items()})


def param_values(cfg: StudyConfig) -> dict[str, Any]:
    """Every search parameter's value in ``cfg`` (what a run with this config trains with)."""
    return {name: getattr(getattr(cfg, p.section), p.key)
            for name, p in SEARCH_PARAMETERS.items()}


def relevant_space(cfg: StudyConfig) -> dict[str, ParamSpec]:
    """The search parameters that matter for the study's method switches, for any KD method
    the space may choose; ``kd_method`` first, as a trial suggests its conditional
    parameters after it (see :func:`used_by`)."""
    space = {k: v for k, v in cfg.search.space.items() if k not in cfg.search.hold}
    variants = [cfg]
    if "kd_method" in space and SEARCH_PARAMETERS["kd_method"].used(cfg):
        variants = [apply_params(cfg, {"kd_method": m}) for m in space["kd_method"].choices]
    keep = {k: v for k, v in space.items()
            if any(SEARCH_PARAMETERS[k].used(c) for c in variants)}
    return dict(sorted(keep.items(), key=lambda kv: kv[0] != "kd_method"))


def fixed_trial(cfg: StudyConfig) -> dict[str, Any]:
    """The study file's own settings as a trial of its search (``optimize --enqueue-fixed``):
    every relevant parameter the fixed settings use, each inside the space (one line
    otherwise: Optuna cannot record a value its distribution does not hold)."""
    values = param_values(cfg)
    out: dict[str, Any] = {}
    for name, spec in relevant_space(cfg).items():
        if not used_by(cfg, name, out):
            continue
        v = values[name]
        inside = v in spec.choices if spec.choices else \
            spec.low is not None and spec.high is not None and spec.low <= v <= spec.high
        if not inside:
            where = list(spec.choices) if spec.choices else f"[{spec.low}, {spec.high}]"
            raise KdigError(f"--enqueue-fixed: the study's {name} = {v!r} is outside "
                            f"search.space.{name} ({where}); widen the space or drop the flag")
        out[name] = v
    return out


def used_by(cfg: StudyConfig, name: str, params: Mapping[str, Any]) -> bool:
    """Whether a trial with ``params`` suggested so far uses search parameter ``name``
    (define-by-run: DKD's parameters only where it chose dkd)."""
    return SEARCH_PARAMETERS[name].used(apply_params(cfg, params))


def _build_space(table: Any, src: str, where: str) -> dict[str, ParamSpec]:
    if not isinstance(table, dict):
        raise KdigError(f"{src}: {where} must be a table of parameters")
    space: dict[str, ParamSpec] = {}
    for name, spec_table in table.items():
        key = f"{where}.{name}"
        if name not in SEARCH_PARAMS:
            raise KdigError(f"{src}: unknown search parameter '{key}'; "
                            f"allowed: {', '.join(SEARCH_PARAMS)}")
        if not isinstance(spec_table, dict):
            raise KdigError(f"{src}: {key} must be a table with low/high[/log] or choices")
        spec = _build(ParamSpec, spec_table, src, key)
        if spec.choices:
            if spec.low is not None or spec.high is not None:
                raise KdigError(f"{src}: {key}: give either choices or low/high, not both")
        elif spec.low is None or spec.high is None or spec.low > spec.high:
            raise KdigError(f"{src}: {key}: needs low <= high (or choices); "
                            f"got low={spec.low}, high={spec.high}")
        elif spec.log and spec.low <= 0:
            raise KdigError(f"{src}: {key}.low = {spec.low}: a log scale needs low > 0")
        if name in _NAMED_CHOICES:
            what, names = _NAMED_CHOICES[name]
            bad = [c for c in spec.choices if c not in names]
            if not spec.choices or bad:
                raise KdigError(f"{src}: {key}.choices = {list(spec.choices)}: a list of "
                                f"{what}; allowed: {', '.join(names)}")
            space[name] = spec
            continue
        if any(isinstance(c, str) for c in spec.choices):
            raise KdigError(f"{src}: {key}.choices = {list(spec.choices)}: allowed: numbers")
        if name == "ig_steps" and not spec.choices:
            raise KdigError(f"{src}: {key}: IG steps are searched over choices "
                            f"(the counts the map store can serve), e.g. choices = [8, 16, 32]")
        if name == "ig_steps" and any(c != int(c) for c in spec.choices):
            raise KdigError(f"{src}: {key}.choices = {list(spec.choices)}: allowed: integers")
        target = _param_field(name)[0]
        for value in (*spec.choices, spec.low, spec.high):
            allowed = None if value is None else _check_range(target, value)
            if allowed is not None:
                raise KdigError(f"{src}: {key} = {value!r}: out of range for {name}; "
                                f"allowed: {allowed}")
        space[name] = spec
    return space


def load_params(path: str) -> dict[str, float | int | str]:
    """A ``[params]`` table of method hyperparameters (the names the search uses), checked."""
    p = Path(path)
    if not p.is_file():
        raise KdigError(f"--params {path}: no such file (give 'best' or a .toml file with a "
                        f"[params] table)")
    table = _read_toml(p)
    params = table.get("params")
    if not isinstance(params, dict) or set(table) != {"params"}:
        raise KdigError(f"{p}: expected exactly one table [params] with keys from "
                        f"{', '.join(SEARCH_PARAMS)}")
    out: dict[str, float | int | str] = {}
    for name, value in params.items():
        if name not in SEARCH_PARAMS:
            raise KdigError(f"{p}: unknown key 'params.{name}'; "
                            f"allowed: {', '.join(SEARCH_PARAMS)}")
        target, tp = _param_field(name)
        ok, converted = _coerce(tp, value)
        if not ok:
            raise KdigError(f"{p}: params.{name} = {value!r}: wrong type; "
                            f"allowed: {_type_name(tp)}")
        allowed = _check_range(target, converted)
        if allowed is not None:
            raise KdigError(f"{p}: params.{name} = {value!r}: out of range; allowed: {allowed}")
        out[name] = converted
    return out
