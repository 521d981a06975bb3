"""The run ledger (kdig_study.ledger): an ablation's finished runs, written beside its
results, taken back by a fresh store only where the ablation and its teacher are the same.
End to end through `ablate`: tests/test_ablation.py::test_smoke_ablation_end_to_end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from kdig_study.errors import KdigError
from kdig_study.ledger import (
    import_ledger,
    import_search_ledger,
    ledger_path,
    search_ledger_path,
    write_ledger,
    write_search_ledger,
)

SHA = "a" * 64
ATTRS = {"config_fingerprint": "cfg1", "data_fingerprint": "data1",
         "ablation": {"design": "fixed", "levels": {"kd": [None, "kd"]},
                      "analysis": {"equivalence_margin": 0.4}, "seeds": {"0": 1000}}}


def _study(tmp_path: Path, name: str, attrs: dict[str, Any] = ATTRS) -> optuna.Study:
    study = optuna.create_study(study_name="s.ablation",
                                storage=f"sqlite:///{tmp_path / name}.db")
    for k, v in attrs.items():
        study.set_user_attr(k, v)
    return study


def _add_run(study: optuna.Study, condition: str, replicate: int, value: float,
             metrics: dict[str, Any] | None = None) -> None:
    kd = int(condition != "student")
    params = {"condition": condition, "replicate": replicate, "kd": kd}
    study.add_trial(create_trial(
        state=TrialState.COMPLETE, value=value, params=params,
        distributions={"condition": CategoricalDistribution(["student", "KD"]),
                       "replicate": IntDistribution(0, 1_000_000),
                       "kd": CategoricalDistribution([0, 1])},
        user_attrs={"test_acc": value - 0.01, "robust": {"jpeg": 0.4},
                    "provenance": {"data": "data1", "teacher": "t1" if kd else None,
                                   "teacher_sha256": SHA if kd else None}}
        | ({"metrics": metrics} if metrics else {}),
        system_attrs={"fixed_params": params}, intermediate_values={1: value / 2, 2: value}))


def _key(params: dict[str, Any]) -> tuple[str, int]:
    return params["condition"], params["replicate"]


def _written(tmp_path: Path) -> tuple[optuna.Study, Path]:
    study = _study(tmp_path, "first")
    for r in range(2):
        _add_run(study, "student", r, 0.5 + r / 10)
        _add_run(study, "KD", r, 0.6 + r / 10)
    path = ledger_path(tmp_path / "out", study.study_name)
    path.parent.mkdir()
    write_ledger(path, study, study.get_trials())
    return study, path


def test_a_fresh_store_takes_back_every_run_once(tmp_path: Path) -> None:
    first, path = _written(tmp_path)
    assert path.name == "s.ablation.runs.json"
    fresh = _study(tmp_path, "fresh")
    _add_run(fresh, "KD", 1, 0.99)  # a run the fresh store already has stays its own
    assert import_ledger(path, fresh, _key, lambda p: SHA) == 3
    assert import_ledger(path, fresh, _key, lambda p: SHA) == 0
    got = {_key(t.params): t for t in fresh.get_trials()}
    assert got["KD", 1].value == 0.99 and len(got) == 4
    for t in first.get_trials():
        if _key(t.params) == ("KD", 1):
            continue
        back = got[_key(t.params)]
        assert back.state == TrialState.COMPLETE and back.value == t.value
        assert back.params == t.params and back.distributions == t.distributions
        assert back.intermediate_values == t.intermediate_values
        assert back.system_attrs["fixed_params"] == t.system_attrs["fixed_params"]
        assert {k: v for k, v in back.user_attrs.items() if k != "from_ledger"} == t.user_attrs
        assert back.user_attrs["from_ledger"] == str(path)
    # a ledger written from the fresh store is the same runs, not marked as taken twice
    write_ledger(path, fresh, fresh.get_trials())
    assert all("from_ledger" not in r["user_attrs"]
               for r in json.loads(path.read_text())["runs"])


def test_a_missing_ledger_adds_nothing(tmp_path: Path) -> None:
    assert import_ledger(tmp_path / "none.runs.json", _study(tmp_path, "x"), _key,
                         lambda p: SHA) == 0


@pytest.mark.parametrize("attrs,fragment", [
    (ATTRS | {"config_fingerprint": "cfg2"}, "config_fingerprint"),
    (ATTRS | {"data_fingerprint": "data2"}, "data_fingerprint"),
    (ATTRS | {"ablation": ATTRS["ablation"] | {"analysis": {"equivalence_margin": 0.3}}},
     "ablation.analysis"),
    (ATTRS | {"ablation": ATTRS["ablation"] | {"design": "best"}}, "ablation.design"),
])
def test_a_ledger_of_another_ablation_is_refused(tmp_path: Path, attrs: dict[str, Any],
                                                 fragment: str) -> None:
    _, path = _written(tmp_path)
    other = _study(tmp_path, "other", attrs)
    with pytest.raises(KdigError, match=f"{path}: its runs are of another ablation.*{fragment}"):
        import_ledger(path, other, _key, lambda p: SHA)
    assert other.get_trials() == []


def test_the_replicate_seeds_may_grow(tmp_path: Path) -> None:
    """A study run again with more seeds records more of them: still the same ablation."""
    _, path = _written(tmp_path)
    more = ATTRS | {"ablation": ATTRS["ablation"] | {"seeds": {"0": 1000, "1": 1001}}}
    assert import_ledger(path, _study(tmp_path, "more", more), _key, lambda p: SHA) == 4


def test_runs_of_other_teacher_weights_are_refused_before_any_is_added(tmp_path: Path) -> None:
    _, path = _written(tmp_path)
    fresh = _study(tmp_path, "fresh")
    asked: list[int] = []

    def other_teacher(params: dict) -> str:
        asked.append(1)
        return "b" * 64

    with pytest.raises(KdigError, match="learned from a teacher whose weights differ"):
        import_ledger(path, fresh, _key, other_teacher)
    assert fresh.get_trials() == []  # the student runs (no teacher) were not added either
    # the student alone needs no teacher: a ledger of student runs never loads one
    student = _study(tmp_path, "student")
    only = tmp_path / "student.runs.json"
    first = optuna.load_study(study_name="s.ablation", storage=f"sqlite:///{tmp_path}/first.db")
    write_ledger(only, first, [t for t in first.get_trials() if t.params["kd"] == 0])
    asked.clear()
    assert import_ledger(only, student, _key, other_teacher) == 2 and asked == []


@pytest.mark.parametrize("text", ["{not json", '{"version": 99, "runs": []}', "[]"])
def test_a_damaged_ledger_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "s.ablation.runs.json"
    path.write_text(text)
    with pytest.raises(KdigError, match="not a run ledger of ablate.*move it away"):
        import_ledger(path, _study(tmp_path, "x"), _key, lambda p: SHA)


def _one_kd_run(tmp_path: Path, metrics: dict[str, Any]) -> Path:
    """A ledger of one KD run that recorded ``metrics``."""
    study = _study(tmp_path, "first")
    _add_run(study, "KD", 0, 0.6, metrics)
    path = tmp_path / "s.ablation.runs.json"
    write_ledger(path, study, study.get_trials())
    return path


def _counting_teacher() -> tuple[list[int], Any]:
    """A teacher_sha256 stand-in that notes each call (a call may train the teacher)."""
    asked: list[int] = []

    def teacher(params: dict) -> str:
        asked.append(1)
        return SHA
    return asked, teacher


def test_runs_of_another_precision_are_refused_before_the_teacher_is_asked(
        tmp_path: Path) -> None:
    """precision 'auto' follows the hardware: a ledger of bf16 runs (a CPU with AMX) taken up
    on an AVX2-only machine (fp32) was refused only by the teacher's checksum, after the
    teacher had trained for an hour."""
    path = _one_kd_run(tmp_path, {"precision": "bf16"})
    asked, teacher = _counting_teacher()
    fresh = _study(tmp_path, "fresh")
    with pytest.raises(KdigError, match=r"trained at bf16 and this machine trains at fp32.*"
                                        r"--reanalyse"):
        import_ledger(path, fresh, _key, teacher, precision="fp32")
    assert asked == [] and fresh.get_trials() == []
    assert import_ledger(path, fresh, _key, teacher, precision="bf16") == 1 and asked == [1]


def test_bf16_runs_of_another_cpu_kernel_family_are_refused_before_the_teacher_is_asked(
        tmp_path: Path) -> None:
    """A ledger of bf16 runs made on an Intel CPU with AMX, taken up on an AMD EPYC with
    AVX512-BF16: both train at bf16, but the teacher came out as other weights there and was
    refused by its checksum only after 37 minutes of training."""
    path = _one_kd_run(tmp_path, {"precision": "bf16", "kernels": "amx"})
    asked, teacher = _counting_teacher()
    fresh = _study(tmp_path, "fresh")
    for here, says in (("avx512_bf16", "uses avx512_bf16"), (None, "runs bf16 on a GPU")):
        with pytest.raises(KdigError, match=rf"trained with amx bf16 kernels and this machine "
                                            rf"{says}: .*--reanalyse"):
            import_ledger(path, fresh, _key, teacher, precision="bf16", kernels=here)
    assert asked == [] and fresh.get_trials() == []
    assert import_ledger(path, fresh, _key, teacher, precision="bf16", kernels="amx") == 1
    assert asked == [1]


def test_runs_that_recorded_no_kernel_family_go_on_to_the_teacher_check(tmp_path: Path) -> None:
    """Ledgers written before the family was recorded are judged by the teacher's checksum."""
    path = _one_kd_run(tmp_path, {"precision": "bf16"})
    fresh = _study(tmp_path, "fresh")
    assert import_ledger(path, fresh, _key, lambda p: SHA, precision="bf16",
                         kernels="avx512_bf16") == 1


def test_the_cpu_bf16_kernel_family_is_read_from_the_cpu_flags(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    import torch

    from kdig_study import engine

    real_open = builtins.open
    cpu = torch.device("cpu")
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(
        info if p == "/proc/cpuinfo" else p, *a, **k))
    for flags, family in (("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "amx"),
                          ("fpu avx2 avx512f avx512_bf16", "avx512_bf16"),
                          # an Intel Xeon with AMX off: its teacher was a third file
                          ("fpu avx2 avx512f avx512_bf16 avx512_fp16", "avx512_fp16"),
                          ("fpu avx2 fma", None)):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        assert engine.cpu_bf16_kernels() == family
        assert engine.resolve_precision("auto", cpu) == ("fp32" if family is None else "bf16")
        assert engine.bf16_kernels("bf16", cpu) == family
        assert engine.bf16_kernels("fp32", cpu) is None
        assert engine.bf16_kernels("bf16", torch.device("meta")) is None


def test_a_tuning_search_made_with_another_bf16_kernel_family_is_refused_before_the_teacher(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tuning search taken from a ledger made on an AMD EPYC (avx512_bf16), on an Intel
    Xeon with AMX off (avx512_fp16): the teacher came out as another file there, and the
    search was refused by its checksum only after the teacher's hour of training."""
    import argparse

    from kdig_study import ablate, engine
    from kdig_study.config import load_study

    url = f"sqlite:///{tmp_path}/kdig.db"
    study = optuna.create_study(study_name="kd_ig-cpu.tune-DKD", storage=url,
                                direction="maximize")
    for kernels in ("avx512_bf16", None):  # a pruned trial records no metrics
        study.add_trial(create_trial(
            value=0.7, params={"temperature": 4.0},
            distributions={"temperature": FloatDistribution(1.0, 10.0)},
            user_attrs={"metrics": {"precision": "bf16", "kernels": kernels}} if kernels
            else {}))
    cfg = load_study("kd_ig", "cpu")
    assert cfg.student_train.precision == "auto"
    args = argparse.Namespace(device="cpu")
    ledger = tmp_path / "kd_ig-cpu.tune-DKD.trials.json"

    def check() -> None:
        ablate._check_tuning_machine(args, cfg, study, "DKD", ledger, url)

    monkeypatch.setattr(engine, "cpu_bf16_kernels", lambda: "avx512_fp16")
    with pytest.raises(KdigError, match=r"^--params per-condition: the search tuning DKD "
                                        r".* trained with avx512_bf16 bf16 kernels and this "
                                        r"machine uses avx512_fp16: .*optuna delete-study"):
        check()
    monkeypatch.setattr(engine, "cpu_bf16_kernels", lambda: None)  # fp32 here
    with pytest.raises(KdigError, match=r"trained at bf16 and this machine trains at fp32"):
        check()
    monkeypatch.setattr(engine, "cpu_bf16_kernels", lambda: "avx512_bf16")
    check()  # the same family: on to the teacher's checksum


def _search(storage: str, name: str = "kd_ig-cpu.tune-DKD") -> optuna.Study:
    """A tuning search of three trials: two complete, one pruned after an epoch."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.set_user_attr("config_fingerprint", "cfg1")
    study.set_user_attr("config", {"kd": {"method": "dkd"}})
    dist = {"temperature": FloatDistribution(1.0, 8.0)}
    for i, (state, value) in enumerate([(TrialState.COMPLETE, 0.61),
                                        (TrialState.PRUNED, None),
                                        (TrialState.COMPLETE, 0.64)]):
        study.add_trial(create_trial(
            state=state, value=value, params={"temperature": 2.0 + i}, distributions=dist,
            user_attrs={"metrics": {"seed": 7 + i}}, intermediate_values={1: 0.3 + i / 10}))
    return study


def _summary(study: optuna.Study) -> list[tuple[Any, ...]]:
    return [(t.state, t.values, t.params, t.intermediate_values,
             {k: v for k, v in t.user_attrs.items() if k != "from_ledger"})
            for t in study.get_trials()]


def test_a_search_ledger_makes_the_search_again_in_a_store_that_lacks_it(
        tmp_path: Path) -> None:
    first = _search(f"sqlite:///{tmp_path / 'a.db'}")
    path = search_ledger_path(tmp_path, first.study_name)
    assert write_search_ledger(path, first) == 3
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'b.db'}")
    assert import_search_ledger(path, storage, first.study_name) == 3
    again = optuna.load_study(study_name=first.study_name, storage=storage)
    assert _summary(again) == _summary(first)
    assert again.user_attrs["config"] == {"kd": {"method": "dkd"}}
    assert again.best_trial.params == {"temperature": 4.0}
    # a store that has the search keeps it: nothing is added twice
    assert import_search_ledger(path, storage, first.study_name) == 0
    assert len(again.get_trials()) == 3


def test_a_half_imported_search_is_made_again(tmp_path: Path) -> None:
    """An import killed between its first and last trial leaves the marker: the next one
    deletes that search and imports it whole."""
    first = _search(f"sqlite:///{tmp_path / 'a.db'}")
    path = search_ledger_path(tmp_path, first.study_name)
    write_search_ledger(path, first)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'b.db'}")
    half = optuna.create_study(study_name=first.study_name, storage=storage)
    half.set_user_attr("ledger_import", "importing")
    half.add_trial(first.get_trials()[0])
    assert import_search_ledger(path, storage, first.study_name) == 3
    assert _summary(optuna.load_study(study_name=first.study_name,
                                      storage=storage)) == _summary(first)


def test_a_search_ledger_of_another_search_is_refused(tmp_path: Path) -> None:
    first = _search(f"sqlite:///{tmp_path / 'a.db'}")
    path = search_ledger_path(tmp_path, "kd_ig-cpu.tune-DIST")
    write_search_ledger(path, first)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'b.db'}")
    with pytest.raises(KdigError, match="not the search 'kd_ig-cpu.tune-DIST'"):
        import_search_ledger(path, storage, "kd_ig-cpu.tune-DIST")
    path.write_text(json.dumps({"version": 1, "runs": []}))
    with pytest.raises(KdigError, match="not a search ledger"):
        import_search_ledger(path, storage, "kd_ig-cpu.tune-DIST")
