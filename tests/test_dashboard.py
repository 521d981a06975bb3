"""optuna-dashboard opens the store: the trial table carries the recorded metrics, and the
artifacts (checkpoint, IG preview) download."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from cli_helpers import run_cli
from conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def test_dashboard_shows_metrics_and_serves_artifacts(isolated_storage: Path,
                                                     warm_cache: Path) -> None:
    proc = run_cli("optimize", "--study", "kd_ig", "--scale", "smoke", "--n-trials", "1",
                   "--no-progress", "--set", "student_train.epochs=1")
    assert proc.returncode == 0, proc.stderr
    url = f"sqlite:///{isolated_storage / 'kdig.db'}"
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "kdig_study.dashboard", "--port", str(port)],
                              cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                status, body = _get(f"{base}/api/studies")
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("dashboard did not start")
        studies = json.loads(body)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["kd_ig-smoke"]
        sid = studies[0]["study_id"]
        detail = json.loads(_get(f"{base}/api/studies/{sid}")[1])
        trial = detail["trials"][0]
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert {"test_acc", "metrics"} <= set(attrs)
        for key in ("params", "compression", "flops", "latency_b1_median_ms", "epochs_run",
                    "ig_gap_median"):
            assert key in attrs["metrics"], key
        names = {a["filename"]: a for a in trial["artifacts"]}
        ckpt = next(a for n, a in names.items() if n.endswith(".safetensors"))
        png = next(a for n, a in names.items() if n.endswith(".png"))
        status, blob = _get(f"{base}/artifacts/{sid}/{trial['trial_id']}/{png['artifact_id']}")
        assert status == 200 and blob[:8] == b"\x89PNG\r\n\x1a\n"
        status, blob = _get(f"{base}/artifacts/{sid}/{trial['trial_id']}/{ckpt['artifact_id']}")
        from safetensors.torch import load
        assert status == 200 and len(load(blob)) > 0
        assert "Validation accuracy" in json.dumps(detail)  # the trial's markdown note
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert optuna.load_study(study_name="kd_ig-smoke", storage=url).best_trial is not None
