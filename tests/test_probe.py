"""What a hostile probe found (each case reproduced, then fixed): the store's side."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import create_trial

from kdig_study.config import load_study
from kdig_study.errors import KdigError
from kdig_study.store import open_storage, open_study

from cli_helpers import assert_one_line_error, run_cli

FP32 = {"teacher": "fp32", "maps": "fp32", "students": "fp32"}


def _open(url: str, fingerprint: str, origin: str) -> optuna.Study:
    return open_study(open_storage(url), "s", load_study("kd_ig", "smoke"),
                      optuna.samplers.RandomSampler(), optuna.pruners.NopPruner(), ["maximize"],
                      url, data_fingerprint=fingerprint, data_origin=origin,
                      precision=FP32, device="cpu")


def test_a_study_refuses_other_data_and_keeps_its_own(tmp_path: Path) -> None:
    """`optimize --data-dir A`, then `--data-dir B` on the same study, added B's trials to
    A's study (rc 0): the data's fingerprint is part of the study's identity."""
    url = f"sqlite:///{tmp_path}/probe.db"
    study = _open(url, "a" * 64, "tree A")
    study.add_trial(create_trial(params={}, distributions={}, value=0.5))
    with pytest.raises(KdigError) as e:
        _open(url, "b" * 64, "tree B")
    msg = str(e.value)
    assert "\n" not in msg
    assert "made on other data (tree A, fingerprint aaaaaaaaaaaa)" in msg
    assert "this run's data is tree B (fingerprint bbbbbbbbbbbb)" in msg
    again = _open(url, "a" * 64, "tree A, moved")  # same pixels elsewhere: the same study
    assert len(again.trials) == 1
    assert again.user_attrs["data_fingerprint"] == "a" * 64
    assert again.user_attrs["data_origin"] == "tree A"


def test_a_study_made_before_data_was_recorded_adopts_its_next_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    study = _open(url, "a" * 64, "tree A")
    storage = open_storage(url)
    sid = storage.get_study_id_from_name("s")
    for key in ("data_fingerprint", "data_origin"):  # as an older version left it
        storage.set_study_user_attr(sid, key, None)
    assert study.user_attrs.get("data_fingerprint") is None
    assert _open(url, "c" * 64, "tree C").user_attrs["data_fingerprint"] == "c" * 64
    with pytest.raises(KdigError, match="made on other data"):
        _open(url, "a" * 64, "tree A")


def _nan_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v.contiguous()
            for k, v in model.state_dict().items()}


def test_nan_teacher_weights_are_refused_in_one_line(tmp_path: Path,
                                                     isolated_storage: Path) -> None:
    """A teacher.weights file of NaNs gave 'validation accuracy 10.00%', a 'nan%' gap under
    a 'stop above 5%' that did not stop, and a completed trial (rc 0)."""
    from safetensors.torch import save_file

    from kdig_study.engine import load_checkpoint
    from kdig_study.models import build_model

    model = build_model(load_study("kd_ig", "smoke").teacher)
    nan = tmp_path / "nan.safetensors"
    save_file(_nan_state(model), str(nan))
    proc = run_cli("train", "--study", "kd_ig", "--scale", "smoke", "--role", "teacher",
                   "--no-progress", "--set", f'teacher.weights="{nan}"')
    assert_one_line_error(proc, f"teacher.weights {nan}: NaN or infinite values",
                          "a teacher needs finite weights")
    assert not list((isolated_storage / "cache").glob("teachers/*/teacher.safetensors"))
    # a cached checkpoint gone bad the same way (same names, a file that reads): refused
    with pytest.raises(KdigError, match="NaN or infinite values in .* tensor"):
        load_checkpoint(nan, build_model(load_study("kd_ig", "smoke").teacher))


def test_a_nan_completeness_gap_fails_the_gap_check(isolated_storage: Path) -> None:
    """NaN > max_gap is False: NaN maps passed the check that must stop them."""
    from kdig_study.data import load_bundle
    from kdig_study.experiment import Context
    from kdig_study.models import build_model
    from kdig_study.teacher import Teacher

    cfg = load_study("kd_ig", "smoke", ["student_train.train_size=40"])
    ctx = Context(cfg, load_bundle(cfg.data), torch.device("cpu"), progress=False)
    ctx.log = lambda *a, **k: None
    model = build_model(cfg.teacher)
    model.load_state_dict(_nan_state(model))
    ctx._teacher = Teacher(model.eval(), "f" * 64, isolated_storage / "t.safetensors", {},
                           trained_now=False)
    with pytest.raises(KdigError) as e:
        ctx.maps(None, "ig")
    assert "median completeness gap above ig.max_gap" in str(e.value)
    assert "nan%" in str(e.value) and "\n" not in str(e.value)


def test_only_the_step_counts_a_run_trains_at_are_held_to_max_gap(warm_cache: Path) -> None:
    """One nested pass makes the maps of every step count a study may search (8 and 16 at
    smoke scale). A fixed ablation at 16 steps on a second cpu teacher was stopped because
    the 8-step maps it never uses had a 5.28% gap (> 5%), after the teacher had trained."""
    from kdig_study.experiment import Context

    ctx = Context.create(load_study("kd_ig", "smoke"), progress=False)
    store = ctx.maps(None, "ig").store
    g8, g16 = store.gap(8)["median"], store.gap(16)["median"]
    assert g8 > g16 and store.counts == (8, 16)
    between = load_study("kd_ig", "smoke", [f"ig.max_gap={(g8 + g16) / 2}"])
    ctx = Context.create(between, progress=False)
    ctx.log = lambda *a, **k: None
    # a run at 16 steps: the same store (no recomputation), and its shuffled control
    assert ctx.maps(None, "ig", (16,)).store.root == store.root
    assert ctx.maps(None, "shuffled", (16,)).computed_images == 0
    # a run at 8 steps, or a search that may pick either: refused, naming the 8 steps
    for steps in ((8,), None):
        with pytest.raises(KdigError) as e:
            ctx.maps(None, "ig", steps)
        assert "(8 steps: " in str(e.value) and "16 steps" not in str(e.value)


@pytest.mark.parametrize("flag,value", [("--images", "0"), ("--images", "-5"),
                                        ("--ig-images", "0"), ("--adaptive-images", "0"),
                                        ("--trials", "0"), ("--repeats", "0")])
def test_bench_sizes_below_one_are_one_line(flag: str, value: str) -> None:
    assert_one_line_error(run_cli("bench", "--scale", "smoke", flag, value),
                          f"{flag} {value}: allowed: a whole number >= 1")


def test_bad_threads_and_absent_devices_are_one_line() -> None:
    from kdig_study.engine import resolve_device

    proc = run_cli("optimize", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   env={"KDIG_THREADS": "abc"})
    assert_one_line_error(proc, "KDIG_THREADS=abc: allowed: a whole number >= 1")
    for name in ("mps", "xpu", "meta"):
        with pytest.raises(KdigError, match=f"--device {name}: allowed: auto, cpu, cuda"):
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(KdigError, match="no CUDA device"):
            resolve_device("cuda:3")


def test_an_ablation_plan_is_bounded_before_it_is_built(isolated_storage: Path) -> None:
    """`ablate --seeds 100000000` took 18.7 GB before printing anything, and left a study."""
    proc = run_cli("ablate", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--seeds", "100000000", "--params", "fixed")
    assert_one_line_error(proc, "--seeds 100000000: 400,000,000 runs planned (4 conditions)",
                          "at most 10,000 runs")
    assert not (isolated_storage / "kdig.db").exists()


def _store_case(n: int = 40, size: int = 8):
    import numpy as np

    from kdig_study.attribution.store import MapSpec

    spec = MapSpec(teacher="t" * 64, data="d" * 64, images="i" * 16, n_images=n,
                   method="trapezoid", baseline="zeros", reduce="abs_sum", counts=(4, 8),
                   precision="fp32")
    # image i's map is all (i + 1) at 4 steps and -(i + 1) at 8: never zero
    rows = np.arange(1, n + 1, dtype=np.float32)[:, None, None] * np.ones((size, size))
    want = np.stack([rows, -rows]).astype(np.float16)

    def chunks(fail_at: int | None = None):
        def chunk(start: int, stop: int):
            if fail_at is not None and start >= fail_at:
                raise KeyboardInterrupt  # Ctrl-C (or a kill) after `fail_at` images
            return want[:, start:stop], np.full((2, stop - start), 0.01, np.float32), {}
        return chunk

    return spec, want, chunks


@pytest.mark.parametrize("damage", ["none", "truncate", "flip"])
def test_an_unfinished_map_store_resumes_only_over_intact_files(damage: str,
                                                                isolated_storage: Path) -> None:
    """kill -9 at 128 images, the .npy truncated, rerun: the store finished 'complete' with
    79 all-zero maps (a memmap reads and writes past a truncated end as zeros)."""
    import numpy as np

    from kdig_study.attribution.store import store_root, write_store

    spec, want, chunks = _store_case()
    index = torch.arange(spec.n_images)
    with pytest.raises(KeyboardInterrupt):
        write_store(spec, index, (8, 8), lambda: chunks(fail_at=16), 8, "maps", progress=False)
    maps_file = store_root(spec) / "maps_s4.npy"
    if damage == "truncate":
        with maps_file.open("r+b") as f:
            f.truncate(maps_file.stat().st_size - 5 * 8 * 8 * 2)
    elif damage == "flip":  # same size, a finished row changed
        arr = np.load(maps_file, mmap_mode="r+")
        arr[3, 2, 2] = 0
        arr.flush()
        del arr
    lines: list[str] = []
    report = write_store(spec, index, (8, 8), chunks, 8, "maps", progress=False,
                         log=lines.append)
    assert report.computed_images == (24 if damage == "none" else 40)
    if damage == "none":
        assert lines == []
    else:
        assert len(lines) == 1 and "computing it from the start" in lines[0], lines
        assert ("truncated or replaced" if damage == "truncate" else "changed on disk") \
            in lines[0]
    for i, c in enumerate(spec.counts):
        assert np.array_equal(np.asarray(report.store.maps(c)), want[i])


def test_damaged_data_and_corrupted_split_caches_are_rebuilt_not_fatal(
        tmp_path: Path, isolated_storage: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged corrupted-split cache failed every trial after it had trained (BadZipFile);
    a damaged decoded-data cache gave a traceback on every run and was never removed."""
    from dataclasses import replace

    from test_data import _make_tree

    from kdig_study.config import DataConfig
    from kdig_study.corruptions import RobustSuite
    from kdig_study.data import load_bundle, load_source

    _make_tree(tmp_path / "tree", per_class=3)
    cfg = DataConfig(path=str(tmp_path / "tree"), val_size=10)
    first = load_source(cfg)
    [cache] = (isolated_storage / "cache" / "data").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:500])  # a cut-off write of another tool
    again = load_source(cfg)
    assert again.fingerprint == first.fingerprint
    assert torch.equal(again.train.images, first.train.images)
    assert "is unreadable; decoding the data again" in capsys.readouterr().out

    study = load_study("kd_ig", "smoke")
    robustness = replace(study.robustness, test_per_setting=10, val_per_setting=10)
    data = load_bundle(study.data)
    suite = RobustSuite(data, robustness)
    for f in (isolated_storage / "cache" / "corrupted").glob("*.npz"):
        f.write_bytes(b"PK\x03\x04 not a zip at all")
    rebuilt = RobustSuite(data, robustness)
    assert torch.equal(rebuilt.test.images, suite.test.images)
    assert torch.equal(rebuilt.val.labels, suite.val.labels)
    assert capsys.readouterr().out.count("is unreadable; building it again") == 2


def test_a_garbage_deletion_check_is_computed_again(warm_cache: Path) -> None:
    from kdig_study.attribute import SANITY_IMAGES, sanity
    from kdig_study.experiment import Context

    ctx = Context.create(load_study("kd_ig", "smoke"), progress=False)
    ctx.log = lambda *a, **k: None
    store = ctx.maps(None, "ig").store
    path = store.root / f"deletion_s{store.variant(8)}_n{SANITY_IMAGES}.json"
    path.write_text("{ this is not json")
    out = sanity(ctx, store, 8)
    assert out["images"] > 0 and out["ratio_other"] > 0
    assert sanity(ctx, store, 8) == out  # and cached again, whole


def test_a_study_whose_maps_fail_the_gap_check_is_not_left_behind(
        warm_cache: Path, isolated_storage: Path) -> None:
    """A config that failed a later check (a gap-stop) still created its study, which then
    refused every later run under the default name as 'another config'."""
    proc = run_cli("optimize", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--n-trials", "1", "--set", "ig.max_gap=1e-9")
    assert_one_line_error(proc, "median completeness gap above ig.max_gap = 0.00%")
    storage = open_storage(f"sqlite:///{isolated_storage}/kdig.db")
    assert "kd_ig-smoke" not in optuna.get_all_study_names(storage)


def test_the_device_check_counts_workers_over_one_shared_window() -> None:
    """Summing each worker's rate over its own window gave 2 workers 3.8x one on 2 cores."""
    from kdig_study.gpu_check import shared_window_rate

    # one after the other: no gain at all, whatever each window's own rate
    assert shared_window_rate([{"images": 100, "start": 0.0, "end": 1.0},
                               {"images": 100, "start": 1.0, "end": 2.0}]) == 100
    # fully overlapping: twice one worker's rate
    assert shared_window_rate([{"images": 100, "start": 5.0, "end": 6.0},
                               {"images": 100, "start": 5.0, "end": 6.0}]) == 200


def test_an_export_folder_is_replaced_as_a_set(tmp_path: Path) -> None:
    """A re-export killed midway left trial 1's student.onnx beside an export.json naming
    trial 0; an export without --int8 left an older student.int8.onnx beside it."""
    from kdig_study.export import publish_folder

    out = tmp_path / "exports" / "s"
    out.mkdir(parents=True)
    for name, text in (("student.onnx", "t0"), ("student.int8.onnx", "t0"),
                       ("export.json", '{"trial": 0}')):
        (out / name).write_text(text)
    staging = tmp_path / "exports" / ".s.partial"
    staging.mkdir()
    (staging / "student.onnx").write_text("t1")
    (staging / "export.json").write_text('{"trial": 1}')
    publish_folder(staging, out)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "student.onnx"]
    assert (out / "student.onnx").read_text() == "t1"
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["s"]


def test_the_ablation_table_heading_is_whole_and_aligned() -> None:
    from kdig_study.ablate import render

    row = {"primary": True, "name": "KD+IG+AT - KD+IG+AT-shuffled", "kind": "comparison",
           "n": 10, "mean": 0.5, "ci_low": -0.1, "ci_high": 1.1, "t_p": 0.04, "t_p_holm": 0.2,
           "wilcoxon_p": 0.05, "wilcoxon_p_holm": 0.3, "tost_p": 0.5, "tost_p_holm": 1.0,
           "d_z": 0.7, "mde": 0.9, "verdict": "inconclusive", "n_equivalence": 40,
           "n_detect": 19}
    text = render({"summaries": [], "comparisons": [row], "effects": [],
                   "correction": "Holm", "alpha": 0.05, "equivalence_margin": 0.004},
                  "test accuracy, %")
    head, line = text.splitlines()[2:4]
    assert head.strip().startswith("comparison (paired) / effect  ")
    assert line.strip().startswith("* KD+IG+AT - KD+IG+AT-shuffled ")
    # the n column ends at the same place in the heading and the row
    assert head.index(" n ") + 2 == line.index(" 10 ") + 3
    assert head.endswith("  verdict")
    assert line.endswith("  inconclusive (equivalence n=40, difference n=19)")
    # p-values of 8 and 9 characters stay apart ("7.19e-117.19e-11" in the teachers study)
    tiny = row | {"t_p": 7.19e-11, "t_p_holm": 7.19e-11, "wilcoxon_p": 0.000481,
                  "wilcoxon_p_holm": 1.23e-100, "tost_p": 1.0, "tost_p_holm": 1.0}
    line = render({"summaries": [], "comparisons": [tiny], "effects": [], "correction": "Holm",
                   "alpha": 0.05, "equivalence_margin": 0.004}, "t").splitlines()[3]
    assert line.split()[8:14] == ["7.19e-11", "7.19e-11", "0.000481", "1.23e-100", "1", "1"]


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 256 KiB file system (tmpfs; root and mount needed, else skip): a disk that fills."""
    import subprocess

    target = tmp_path / "small-disk"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(target)],
                      capture_output=True).returncode != 0:
        pytest.skip("a full disk needs a tmpfs mount (root): not available here")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_full_disk_writing_weights_is_one_line(full_disk: Path) -> None:
    """Trial weights on a full disk raised SafetensorError with a traceback."""
    from safetensors.torch import save_file

    from kdig_study.paths import atomic_write

    state = {"w": torch.zeros(1024, 1024)}  # 4 MiB
    with pytest.raises(KdigError) as e:
        atomic_write(full_disk / "w.safetensors", lambda tmp: save_file(state, str(tmp)))
    assert "\n" not in str(e.value) and f"cannot write {full_disk / 'w.safetensors'}" in \
        str(e.value)
    assert not list(full_disk.iterdir())  # no partial file left


def test_a_map_store_too_large_for_its_disk_is_one_line_not_a_bus_error(
        full_disk: Path) -> None:
    """Its memmaps are sparse: the disk filled while maps were written, and the process died
    of SIGBUS ("Bus error"). Their blocks are reserved when they are made."""
    import subprocess
    import sys

    # the bare process imports numpy only (the package brings torch: seconds per process)
    code = ("import numpy as np, sys\n"
            f"f = {str(full_disk / 'maps.npy')!r}\n"
            "a = np.lib.format.open_memmap(f, mode='w+', dtype=np.float16, shape=(64, 64, 64))\n"
            "if sys.argv[1] == 'reserve':\n"
            "    from kdig_study.attribution.store import _reserve\n"
            "    from kdig_study.errors import KdigError\n"
            "    try:\n"
            "        _reserve(__import__('pathlib').Path(f).parent, [__import__('pathlib').Path(f)])\n"
            "    except KdigError as e:\n"
            "        print(e); sys.exit(2)\n"
            "a[:] = 1\n"
            "a.flush()\n")
    bare = subprocess.run([sys.executable, "-c", code, "bare"], capture_output=True, text=True)
    assert bare.returncode == -7  # SIGBUS: what a map build on a full disk did
    (full_disk / "maps.npy").unlink()
    fixed = subprocess.run([sys.executable, "-c", code, "reserve"], capture_output=True,
                           text=True)
    assert fixed.returncode == 2, fixed.stderr
    assert fixed.stdout.strip().startswith(f"map store {full_disk} needs 0.5 MB: No space left")


# -- the minor findings: each one line, before any work ---------------------------------------

@pytest.mark.parametrize("command,args,fragments", [
    ("pruning", ["--study", "kd_ig", "--unpruned", "u", "--rho", "2"], ["--rho 2.0", "-1 <"]),
    ("pruning", ["--study", "kd_ig", "--unpruned", "u", "--rho", "nan"], ["--rho nan"]),
    ("attribute", ["--study", "kd_ig", "--scale", "smoke", "--steps", "99999"],
     ["--steps 99999", "1 to 4096"]),
])
def test_out_of_range_arguments_are_one_line(command: str, args: list[str],
                                             fragments: list[str]) -> None:
    assert_one_line_error(run_cli(command, *args), *fragments)


@pytest.mark.parametrize("command,args", [
    ("report", ["--study", "kd_ig", "--scale", "smoke"]),
    ("export", ["--study", "kd_ig", "--scale", "smoke", "--trial", "best"]),
    ("dashboard", []),
])
def test_a_mistyped_store_path_is_one_line_and_creates_nothing(command: str, args: list[str],
                                                               tmp_path: Path) -> None:
    """report, export and dashboard created an empty store there (the dashboard served it)."""
    db = tmp_path / "typo" / "kdgi.db"
    assert_one_line_error(run_cli(command, *args, "--storage", f"sqlite:///{db}"),
                          f"no SQLite store at {db}")
    assert not (tmp_path / "typo").exists()


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("{}")
    proc = run_cli("ablate", "--study", "kd_ig", "--scale", "smoke", "--params", "fixed",
                   "--seeds", "1", "--out", str(target))
    assert_one_line_error(proc, f"--out {target} is a file; give a folder")
    assert "[1/" not in proc.stdout  # no run started
    check = run_cli("gpu_check", "--out", str(target), "--device", "cpu")
    assert_one_line_error(check, f"--out {target} is a file")
    assert "without --tiny on a CPU" in check.stdout  # said before the full-size run starts


def test_a_changed_config_names_the_keys_that_changed_and_only_those(tmp_path: Path) -> None:
    """Stored lists compared unequal to the config's tuples, and keys outside the
    fingerprint (overrides) were listed: every key but the changed one."""
    url = f"sqlite:///{tmp_path}/probe.db"
    base = load_study("kd_ig", "smoke")
    open_study(open_storage(url), "s", base, optuna.samplers.RandomSampler(),
               optuna.pruners.NopPruner(), ["maximize"], url, data_fingerprint="d",
               data_origin="o", precision=FP32, device="cpu")
    changed = load_study("kd_ig", "smoke", ["kd.temperature=7", "measure.latency_runs=7"])
    with pytest.raises(KdigError) as e:
        open_study(open_storage(url), "s", changed, optuna.samplers.RandomSampler(),
                   optuna.pruners.NopPruner(), ["maximize"], url, data_fingerprint="d",
                   data_origin="o", precision=FP32, device="cpu")
    assert "(changed: kd.temperature)" in str(e.value)


def test_a_damaged_preview_is_made_again(warm_cache: Path) -> None:
    from PIL import Image

    from kdig_study.experiment import Context

    lines: list[str] = []
    ctx = Context.create(load_study("kd_ig", "smoke"), progress=False)
    ctx.log = lambda *a, **k: lines.append(" ".join(map(str, a)))
    store = ctx.maps().store
    path = ctx.preview(store, 8)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # cut short
    assert ctx.preview(store, 8) == path and path.read_bytes() == good
    assert lines == [f"cached figure {path} is damaged; making it again"]
    with Image.open(path) as im:
        im.load()


def test_a_timeout_counts_from_the_command_start(warm_teacher: Path) -> None:
    """It counted from the first trial, after the teacher and maps (which can take hours)."""
    proc = run_cli("optimize", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--n-trials", "2", "--set", "search.timeout=0.5")  # maps cold: > 0.5 s
    assert proc.returncode == 0, proc.stderr
    assert "--timeout reached: no new trials started" in proc.stdout
    assert "trial 0" not in proc.stdout


def test_export_of_an_unfinished_trial_suggests_only_what_exists(tmp_path: Path) -> None:
    from kdig_study.trials import pick_trial

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/t.db", study_name="t")
    study.add_trial(create_trial(state=optuna.trial.TrialState.FAIL))
    with pytest.raises(KdigError, match="has no completed trial yet$"):
        pick_trial(study, "0")
    study.add_trial(create_trial(params={}, distributions={}, value=0.5))
    with pytest.raises(KdigError, match="try --trial best, or one of 1$"):
        pick_trial(study, "0")


# --- precision on mixed hardware (issue 29) ---

@pytest.mark.parametrize("capability,emulated,expected", [
    ((7, 5), True, "fp32"),   # T4: bf16 only emulated, slower than fp32
    ((7, 0), True, "fp32"),   # V100
    ((8, 0), False, "bf16"),  # A100
    ((9, 0), False, "bf16"),  # H100/H200
])
def test_auto_precision_takes_bf16_only_where_the_gpu_has_it_natively(
        monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], emulated: bool,
        expected: str) -> None:
    from kdig_study.engine import resolve_precision

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return capability[0] >= 8 or (including_emulation and emulated)

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"  # asked, not resolved


def test_auto_precision_asks_the_gpu_the_run_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A V100 as device 0 beside an A100 as device 1: torch's is_bf16_supported() asks the
    current device (0) whatever --device says."""
    from kdig_study.engine import resolve_precision

    capabilities = {0: (7, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capabilities[d])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capabilities[0][0] >= 8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_precision("auto", torch.device("cuda", 1)) == "bf16"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp32"


def test_a_study_refuses_a_machine_where_auto_resolves_another_precision(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/p.db"
    cfg = load_study("kd_ig", "smoke")

    def opened(precision: dict[str, str], device: str) -> optuna.Study:
        return open_study(open_storage(url), "s", cfg, optuna.samplers.RandomSampler(),
                          optuna.pruners.NopPruner(), ["maximize"], url, data_fingerprint="d",
                          data_origin="o", precision=precision, device=device)

    bf16 = {"teacher": "bf16", "maps": "bf16", "students": "bf16"}
    study = opened(bf16, "cuda:NVIDIA A100:12.8")
    assert study.user_attrs["precision"] == bf16 | {"device": "cuda:NVIDIA A100:12.8"}
    opened(bf16, "cpu:Xeon with AMX")  # the same precision elsewhere: one study
    with pytest.raises(KdigError) as e:
        opened(bf16 | {"students": "fp32"}, "cuda:Tesla T4:12.8")
    assert str(e.value).count("\n") == 0
    assert "made with students at bf16 on cuda:NVIDIA A100:12.8; here (cuda:Tesla T4:12.8) " \
           "the config resolves students at fp32" in str(e.value)
    # a study made before the precision was recorded takes this machine's
    study.set_user_attr("precision", None)
    assert opened(FP32, "cpu").user_attrs["precision"] == FP32 | {"device": "cpu"}


def test_export_finds_the_teacher_at_the_precision_its_study_recorded(
        monkeypatch: pytest.MonkeyPatch, warm_teacher: Path) -> None:
    """A teacher trained where "auto" is bf16 is read on a CPU where it is fp32 (and the
    other way round): its fingerprint holds the precision, so export looked for another
    teacher and exported the student alone."""
    from kdig_study import engine
    from kdig_study.data import load_bundle
    from kdig_study.teacher import cached_teacher

    cfg = load_study("kd_ig", "smoke")
    data = load_bundle(cfg.data)
    cpu = torch.device("cpu")
    made_at = engine.resolve_precision("auto", cpu)
    here = cached_teacher(cfg, data, cpu)
    assert here is not None
    monkeypatch.setattr(engine, "cpu_bf16_kernels", lambda: "amx" if made_at == "fp32" else None)
    assert engine.resolve_precision("auto", cpu) != made_at  # now "other hardware"
    assert cached_teacher(cfg, data, cpu) is None
    found = cached_teacher(cfg, data, cpu, made_at)
    assert found is not None and found.fingerprint == here.fingerprint
