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
