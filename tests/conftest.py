"""Shared fixtures. Every test gets its own storage and cache folders (KDIG_STORAGE,
KDIG_CACHE) so no test reads another's store or cache, and none touches ./storage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def shared_cifar() -> Path:
    if not SHARED_CIFAR.is_file():
        pytest.skip(f"real CIFAR-10 copy not present at {SHARED_CIFAR}")
    return SHARED_CIFAR


@pytest.fixture(scope="module")
def setup():
    """A smoke teacher trained for 3 epochs (once per module), with its data and the data's
    mean and std as [1, 3, 1, 1] tensors: what the IG tests integrate."""
    import dataclasses

    import torch

    from kdig_study.config import load_study
    from kdig_study.data import load_bundle
    from kdig_study.engine import seeded_model, train
    from kdig_study.models import build_model

    cfg = load_study("kd_ig", "smoke")
    data = load_bundle(cfg.data)
    teacher = seeded_model(lambda: build_model(cfg.teacher), 0)
    train(teacher, data.train, data, dataclasses.replace(cfg.teacher_train, epochs=3),
          device=torch.device("cpu"), progress=False, evaluate_test=False)
    teacher.eval().to(memory_format=torch.channels_last)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    return cfg, data, teacher, mean, std
