"""One model's rows of the Deployment table: exported to ONNX, checked against PyTorch on the
whole test split, optionally quantised to int8, and timed beside PyTorch eager and
torch.compile at the same thread count (used by `export` and the deploy benchmark)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdig_study.config import DEPLOY_BATCHES
from kdig_study.data import stratified_order
from kdig_study.deploy import (
    Deployable,
    export_onnx,
    ort_logits,
    parity,
    quantize_int8,
    session,
    torch_logits,
)
from kdig_study.errors import KdigError
from kdig_study.experiment import Context
from kdig_study.measure import time_calls, torch_threads
from kdig_study.models import Net
from kdig_study.paths import file_sha256

MIN_AGREEMENT = 0.999
CALIBRATION_IMAGES = 512


def _accuracy(logits: np.ndarray, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels.numpy()).mean())


def _robust(sess_or_model: Any, ctx: Context, ort: bool) -> float | None:
    """Mean accuracy over the corruption suite's test settings."""
    suite = ctx.robust_suite()
    if suite is None:
        return None
    s, m = suite.test.images.shape[:2]
    flat = suite.test.images.reshape(s * m, *suite.test.images.shape[2:])
    logits = ort_logits(sess_or_model, flat) if ort else torch_logits(sess_or_model, flat)
    return float((logits.argmax(1).reshape(s, m) == suite.test.labels.numpy()).mean())


def _latency(fn_by_batch: dict[int, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for b, fn in fn_by_batch.items():
        t = time_calls(fn, warmup=10, runs=50 if b == 1 else 20)
        out[f"b{b}"] = {"median_ms": t.median_ms, "p90_ms": t.p90_ms, "runs": t.runs}
    return out


def measure_role(role: str, model: Net, ctx: Context, out_dir: Path, int8: bool,
                 compile_: bool, threads: int, log: Any = print,
                 int8_activations: str | None = None) -> list[dict[str, Any]]:
    """Export, check, compare and time one model; the rows of the Deployment table."""
    data = ctx.data
    wrapped = Deployable(model.float().cpu().eval(), data.mean, data.std).eval()
    fp32_path = out_dir / f"{role}.onnx"
    size = data.image_size
    export_onnx(wrapped, fp32_path, image_size=size)
    sess = session(fp32_path, threads)
    with torch_threads(threads):
        ref = torch_logits(wrapped, data.test.images)
    got = ort_logits(sess, data.test.images)
    par = parity(ref, got)
    log(f"{role}: ONNX fp32 agrees with PyTorch on {par.agreement:.3%} of {par.n:,} test "
        f"images; max |logit difference| {par.max_abs_logit_diff:.2e}")
    if par.agreement < MIN_AGREEMENT:
        fp32_path.unlink(missing_ok=True)
        raise KdigError(f"{role}: onnxruntime agrees with PyTorch on only "
                        f"{par.agreement:.2%} of the test images (needed: "
                        f"{MIN_AGREEMENT:.1%}); max |logit difference| "
                        f"{par.max_abs_logit_diff:.3g}; the export was removed")
    x = {b: torch.rand(b, 3, size, size) for b in DEPLOY_BATCHES}
    clean = _accuracy(got, data.test.labels)
    robust = _robust(sess, ctx, ort=True)
    rows = []
    with torch_threads(threads), torch.inference_mode():
        eager = _latency({b: (lambda b=b: wrapped(x[b])) for b in DEPLOY_BATCHES})
        rows.append({"model": role, "format": "PyTorch eager fp32", "bytes": None,
                     "test_acc": _accuracy(ref, data.test.labels),
                     "robust_test_acc": _robust(wrapped, ctx, ort=False), "latency": eager})
        if compile_:
            compiled = torch.compile(wrapped, dynamic=False)
            rows.append({"model": role, "format": "PyTorch torch.compile fp32", "bytes": None,
                         "test_acc": rows[0]["test_acc"],
                         "robust_test_acc": rows[0]["robust_test_acc"],
                         "latency": _latency({b: (lambda b=b: compiled(x[b]))
                                              for b in DEPLOY_BATCHES})})
    onnx_x = {b: x[b].numpy() for b in DEPLOY_BATCHES}
    rows.append({"model": role, "format": "ONNX Runtime fp32", "bytes": fp32_path.stat().st_size,
                 "file": fp32_path.name, "sha256": file_sha256(fp32_path), "test_acc": clean,
                 "robust_test_acc": robust, "agreement_with_pytorch": par.agreement,
                 "max_abs_logit_diff": par.max_abs_logit_diff,
                 "latency": _latency({b: (lambda b=b: sess.run(None, {"images": onnx_x[b]}))
                                      for b in DEPLOY_BATCHES})})
    if int8:
        int8_path = out_dir / f"{role}.int8.onnx"
        train_set, _ = data.train_subset(ctx.cfg.student_train.train_size)
        calib = stratified_order(train_set.labels, seed=0)[:CALIBRATION_IMAGES]
        acts = quantize_int8(fp32_path, int8_path, train_set.images[calib], int8_activations)
        qs = session(int8_path, threads)
        q_logits = ort_logits(qs, data.test.images)
        q_clean = _accuracy(q_logits, data.test.labels)
        q_robust = _robust(qs, ctx, ort=True)
        rows.append({"model": role,
                     "format": f"ONNX Runtime int8 (static QDQ, per-channel, {acts} activations)",
                     "activations": acts, "bytes": int8_path.stat().st_size,
                     "file": int8_path.name,
                     "sha256": file_sha256(int8_path), "test_acc": q_clean,
                     "robust_test_acc": q_robust, "delta_test_acc": q_clean - clean,
                     "delta_robust_test_acc": None if robust is None or q_robust is None
                     else q_robust - robust,
                     "agreement_with_fp32": parity(got, q_logits).agreement,
                     "calibration": f"{len(calib)} stratified training images",
                     "latency": _latency({b: (lambda b=b: qs.run(None, {"images": onnx_x[b]}))
                                          for b in DEPLOY_BATCHES})})
    return rows
