"""What an ablation sweeps: nothing, one setting, or two crossed.

``--sweep KEY=V1,V2,...`` varies one setting: the student's ``drop_blocks`` or ``width`` (a
compression sweep) or any SWEEPABLE study key (``ig.overlay_strength``: a dose-response
sweep). Given twice, the two are crossed: every condition runs at every pair of values (a
level), with the same replicates, so each level is a paired ablation of its own. The keys
keep the order given: it names the study (another order is another study) and puts the
first key on the report's x axis.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from kdig_study.config import SWEEP_KEYS, StudyConfig, with_setting
from kdig_study.errors import KdigError

Level = tuple[float, ...]  # one value per swept key, in the keys' order
JOIN = "-x-"  # between the keys of a crossed sweep in a study name
MAX_KEYS = 2


@dataclass(frozen=True)
class Sweep:
    keys: tuple[str, ...] = ()
    values: tuple[tuple[float, ...], ...] = ()  # each key's values, as given

    def __bool__(self) -> bool:
        return bool(self.keys)

    @property
    def name(self) -> str:
        """The keys as an ablation study's name carries them: ``k`` or ``k1-x-k2`` (a name
        of file-safe characters: the results' files are named after the study)."""
        return JOIN.join(self.keys)

    @classmethod
    def named(cls, name: str) -> Sweep:
        """The keys of :attr:`name` (their values: on the study's trials)."""
        return cls(tuple(name.split(JOIN)))

    def levels(self) -> list[Level]:
        """Every combination of values (the first key outermost); [()] without a sweep."""
        return list(itertools.product(*self.values))

    def params(self, level: Level) -> dict[str, float]:
        return dict(zip(self.keys, level, strict=True))

    def level_of(self, params: dict[str, Any]) -> Level:
        """The level a trial's parameters name (a missing key: None in its place)."""
        return tuple(params.get(k) for k in self.keys)  # type: ignore[misc]

    def text(self, level: Level) -> str:
        """E.g. "ig.overlay_strength=0.25, student_train.epochs=16"."""
        return ", ".join(f"{k}={v:g}" for k, v in zip(self.keys, level, strict=True))

    def identity(self) -> dict[str, Any]:
        """As the ablation study records it: one key as before crossed sweeps existed
        (its studies keep matching), two as lists."""
        if len(self.keys) == 1:
            return {"sweep_key": self.keys[0], "sweep_values": list(self.values[0])}
        if not self.keys:
            return {"sweep_key": None, "sweep_values": None}
        return {"sweep_key": list(self.keys), "sweep_values": [list(v) for v in self.values]}

    def apply(self, cfg: StudyConfig, level: Level) -> StudyConfig:
        """``cfg`` at one level: the student's shape, or any swept study key."""
        for key, value in zip(self.keys, level, strict=True):
            if key == "drop_blocks":
                cfg = dataclasses.replace(cfg, student=dataclasses.replace(
                    cfg.student, drop_blocks=int(value)))
            elif key == "width":
                cfg = dataclasses.replace(cfg, student=dataclasses.replace(
                    cfg.student, width=float(value)))
            else:
                cfg = with_setting(cfg, key, value, "--sweep")
        return cfg


NO_SWEEP = Sweep()


def parse_sweeps(texts: list[str] | None, cfg: StudyConfig) -> Sweep:
    """``--sweep`` as given (none, once, or twice: crossed), every value checked against
    the study before anything runs."""
    texts = texts or []
    if len(texts) > MAX_KEYS:
        raise KdigError(f"--sweep is given {len(texts)} times; allowed: at most {MAX_KEYS} "
                        f"(two sweeps are crossed)")
    keys = tuple(t.partition("=")[0] for t in texts)
    # width and drop_blocks are student.width and student.drop_blocks by their short names
    settings = [f"student.{k}" if k in SWEEP_KEYS else k for k in keys]
    if len(set(settings)) != len(settings):
        raise KdigError(f"--sweep {' and '.join(keys)}: one setting given twice; give each "
                        f"key once, with all its values")
    if sum(s.startswith("student.") for s in settings) > 1:
        raise KdigError(f"--sweep {' and '.join(keys)}: one compression key at a time "
                        f"({' or '.join(SWEEP_KEYS)}); cross it with another SECTION.KEY")
    sweep = Sweep(keys, tuple(_parse_one(t, cfg) for t in texts))
    for level in sweep.levels():  # a pair may break a check across fields
        sweep.apply(cfg, level)
    return sweep


def _parse_one(text: str, cfg: StudyConfig) -> tuple[float, ...]:
    """One ``KEY=V1,V2,...``'s values, each checked."""
    key, _, values = text.partition("=")
    try:
        nums = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        nums = []
    if not nums or not all(math.isfinite(v) for v in nums) or \
            (key not in SWEEP_KEYS and "." not in key):
        raise KdigError(f"--sweep {text}: expected KEY=V1,V2,... (finite numbers) with KEY one "
                        f"of {', '.join(SWEEP_KEYS)} (the student: a compression sweep) or "
                        f"SECTION.KEY (e.g. ig.overlay_strength: a dose-response sweep)")
    if len(set(nums)) != len(nums):
        raise KdigError(f"--sweep {text}: a value is given twice")
    if key not in SWEEP_KEYS:
        for v in nums:  # each value checked like a study file's, before anything runs
            with_setting(cfg, key, v, f"--sweep {text}")
        return tuple(nums)
    arch = cfg.student.arch
    if key == "drop_blocks" and (arch != "mobilenetv2" or
                                 any(v != int(v) or not 0 <= v <= 17 for v in nums)):
        raise KdigError(f"--sweep {text}: drop_blocks compresses a mobilenetv2 student "
                        f"(integers 0..17); this student is {arch}: sweep width instead")
    if key == "width" and any(not 0 < v <= 4 for v in nums):
        raise KdigError(f"--sweep {text}: width values must be > 0 and <= 4")
    return tuple(nums)
