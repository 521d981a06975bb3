"""Shared fixtures. Every test gets its own storage and cache folders (KDIG_STORAGE,
KDIG_CACHE) so no test reads another's store or cache, and none touches ./storage.

The cache starts empty (cold). A test that needs the smoke study's teacher, maps and
corrupted splits but asserts nothing about making them asks for ``warm_cache``: a copy of
one session-wide cache built once, so no such test retrains the teacher."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Under pytest-xdist (`-n auto`, the default options) each test process gets its share of
# the cores as torch threads, and so do the commands it starts (OMP_NUM_THREADS is read when
# torch loads): two processes of two threads each on two cores ran the suite 2.4x slower.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

REPO = Path(__file__).resolve().parent.parent
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow") or os.environ.get("KDIG_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with KDIG_SLOW=1 or --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    storage = tmp_path / "storage"
    monkeypatch.setenv("KDIG_STORAGE", str(storage))
    monkeypatch.setenv("KDIG_CACHE", str(storage / "cache"))
    monkeypatch.setenv("KDIG_STUDIES", str(REPO / "studies"))
    monkeypatch.delenv("KDIG_DATA", raising=False)
    return storage


# The map sources the warm cache holds (IG and the control the default tests overlay; the
# slow tests compute the others they use).
WARM_SOURCES = ("ig", "shuffled")


@pytest.fixture(scope="session")
def warm_cache_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kd_ig smoke study's cache, built once per session: decoded data, the teacher,
    IG maps of every step count the study searches, the control stores and the corrupted
    splits (what `optimize --study kd_ig --scale smoke` computes before its first trial)."""
    from kdig_study.config import load_study
    from kdig_study.experiment import Context

    root = tmp_path_factory.mktemp("warm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDIG_STORAGE", str(root / "storage"))
        mp.setenv("KDIG_CACHE", str(root / "cache"))
        mp.delenv("KDIG_DATA", raising=False)
        ctx = Context.create(load_study("kd_ig", "smoke"), progress=False)
        ctx.log = lambda *a, **k: None
        ctx.teacher()
        for source in WARM_SOURCES:
            ctx.maps(None, source)
        ctx.robust_suite()
    return root / "cache"


@pytest.fixture
def warm_cache(warm_cache_source: Path, isolated_storage: Path) -> Path:
    """This test's cache folder, holding a copy of the session's warm cache (a copy, not
    links: a test may damage or extend what it finds)."""
    cache = isolated_storage / "cache"
    shutil.copytree(warm_cache_source, cache, dirs_exist_ok=True)
    return cache


@pytest.fixture
def warm_teacher(warm_cache_source: Path, isolated_storage: Path) -> Path:
    """This test's cache with the session's smoke teacher and data only: maps and corrupted
    splits are made cold (for tests that assert how maps are computed)."""
    cache = isolated_storage / "cache"
    shutil.copytree(warm_cache_source, cache, dirs_exist_ok=True,
                    ignore=lambda folder, names: [n for n in names if n in ("ig", "corrupted")
                                                  and Path(folder) == warm_cache_source])
    return cache


@pytest.fixture(scope="session")
def shared_cifar() -> Path:
    if not SHARED_CIFAR.is_file():
        pytest.skip(f"real CIFAR-10 copy not present at {SHARED_CIFAR}")
    return SHARED_CIFAR


@pytest.fixture(scope="session")
def setup(warm_cache_source: Path):
    """The session's smoke teacher (the warm cache's, loaded; tests only read it), with its
    data and the data's mean and std as [1, 3, 1, 1] tensors: what the IG tests integrate."""
    import torch

    from kdig_study.config import load_study
    from kdig_study.data import load_bundle
    from kdig_study.teacher import get_teacher

    cfg = load_study("kd_ig", "smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDIG_CACHE", str(warm_cache_source))
        data = load_bundle(cfg.data)
        teacher = get_teacher(cfg, data, torch.device("cpu"), progress=False)
    assert not teacher.trained_now, "the warm cache should hold the smoke teacher"
    model = teacher.model.eval().to(memory_format=torch.channels_last)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    return cfg, data, model, mean, std


def pytest_collection_finish(session: pytest.Session) -> None:
    """Collection has imported torch, Optuna, SciPy and the rest: move those objects out of
    the garbage collector's view. Each full collection otherwise walks them all (about 0.7 s
    here, measured), a dozen times a run."""
    import gc

    gc.freeze()
