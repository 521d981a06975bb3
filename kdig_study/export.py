"""Export a searched student (and the teacher, for comparison) to ONNX; check it, compare it
with PyTorch on the whole test split, optionally quantise it to int8, and time it.

    python -m kdig_study.export --study kd_ig --scale cpu
    python -m kdig_study.export --study kd_ig --scale cpu --trial 12 --int8

Writes storage/exports/<study>/student.onnx (and .int8.onnx, teacher.onnx, ...) beside
export.json: the provenance (study, trial, parameters, accuracy, opset, versions, file
checksums) and the measurements (size, clean and corrupted test accuracy, latency in
onnxruntime, PyTorch eager and torch.compile at batch 1 and 128, same thread count). The
report's Deployment section shows them. Needs `pip install -e ".[deploy]"`.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.artifacts import download_artifact, get_all_artifact_meta
from optuna.trial import FrozenTrial, TrialState

from kdig_study import __version__
from kdig_study.cli import Parser, add_study_args, load_from_args, run
from kdig_study.config import StudyConfig
from kdig_study.data import stratified_order
from kdig_study.deploy import (
    INT8_ACTIVATIONS,
    OPSET,
    Deployable,
    default_int8_activations,
    export_onnx,
    ort_logits,
    parity,
    quantize_int8,
    require_deploy,
    session,
    torch_logits,
)
from kdig_study.engine import load_checkpoint
from kdig_study.errors import KdigError
from kdig_study.experiment import Context
from kdig_study.measure import default_threads, time_calls, torch_threads
from kdig_study.models import Net, build_model
from kdig_study.objectives import choose_best
from kdig_study.paths import file_sha256, safe_name, storage_dir, write_json
from kdig_study.store import artifact_store, default_url, open_storage, quiet_optuna_logs
from kdig_study.teacher import teacher_fingerprint, teacher_path

MIN_AGREEMENT = 0.999
CALIBRATION_IMAGES = 512
BATCHES = (1, 128)


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kdig_study.export", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p)
    p.add_argument("--trial", default="best", help="best (the search's chosen trial) or N")
    p.add_argument("--int8", action="store_true", help="also quantise to int8 (static, QDQ)")
    p.add_argument("--int8-activations", choices=INT8_ACTIVATIONS, default=None,
                   help="activation type of the int8 model (weights are int8); default: "
                        f"onnxruntime's fast kind on this machine ({default_int8_activations()})")
    p.add_argument("--storage", default=None, help="default: sqlite:///storage/kdig.db")
    p.add_argument("--study-name", default=None, help="default: <study>-<scale>")
    p.add_argument("--out", default=None, help="default: storage/exports/<study name>")
    p.add_argument("--no-teacher", action="store_true", help="export the student only")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile latency rows (compiling takes a minute)")
    return p


def exports_dir() -> Path:
    return storage_dir() / "exports"


def pick_trial(study: optuna.Study, which: str) -> FrozenTrial:
    if which == "best":
        best, _ = choose_best(study)
        if best is None:
            raise KdigError(f"study '{study.study_name}' has no completed trial to export")
        return best
    try:
        number = int(which)
    except ValueError:
        raise KdigError(f"--trial {which}: allowed: best or a trial number") from None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise KdigError(f"--trial {number}: study '{study.study_name}' has trials "
                        f"0..{max(trials, default=-1)}")
    t = trials[number]
    if t.state != TrialState.COMPLETE:
        raise KdigError(f"trial {number} of '{study.study_name}' is {t.state.name.lower()}: "
                        f"only completed trials keep their weights; try --trial best")
    return t


def student_weights(study: optuna.Study, trial: FrozenTrial, cfg: StudyConfig, n_classes: int
                    ) -> Net:
    """The trial's best-epoch weights (its safetensors artifact), loaded strictly."""
    metas = [m for m in get_all_artifact_meta(trial, storage=study._storage)
             if m.filename.endswith(".safetensors")]
    if not metas:
        raise KdigError(f"trial {trial.number} of '{study.study_name}' has no weights artifact "
                        f"(it ran without an artifact store); choose another --trial")
    model = build_model(cfg.student, n_classes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        try:
            download_artifact(artifact_store=artifact_store(), file_path=str(path),
                              artifact_id=metas[0].artifact_id)
        except Exception as e:  # the artifact folder is elsewhere, or the file is gone
            raise KdigError(f"trial {trial.number}: its weights artifact could not be read "
                            f"({e}); is KDIG_ARTIFACTS the folder the search wrote to?") from None
        load_checkpoint(path, model)
    return model.eval()


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
    export_onnx(wrapped, fp32_path)
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
    x = {b: torch.rand(b, 3, 32, 32) for b in BATCHES}
    clean = _accuracy(got, data.test.labels)
    robust = _robust(sess, ctx, ort=True)
    rows = []
    with torch_threads(threads), torch.inference_mode():
        eager = _latency({b: (lambda b=b: wrapped(x[b])) for b in BATCHES})
        rows.append({"model": role, "format": "PyTorch eager fp32", "bytes": None,
                     "test_acc": _accuracy(ref, data.test.labels),
                     "robust_test_acc": _robust(wrapped, ctx, ort=False), "latency": eager})
        if compile_:
            compiled = torch.compile(wrapped, dynamic=False)
            rows.append({"model": role, "format": "PyTorch torch.compile fp32", "bytes": None,
                         "test_acc": rows[0]["test_acc"],
                         "robust_test_acc": rows[0]["robust_test_acc"],
                         "latency": _latency({b: (lambda b=b: compiled(x[b]))
                                              for b in BATCHES})})
    onnx_x = {b: x[b].numpy() for b in BATCHES}
    rows.append({"model": role, "format": "ONNX Runtime fp32", "bytes": fp32_path.stat().st_size,
                 "file": fp32_path.name, "sha256": file_sha256(fp32_path), "test_acc": clean,
                 "robust_test_acc": robust, "agreement_with_pytorch": par.agreement,
                 "max_abs_logit_diff": par.max_abs_logit_diff,
                 "latency": _latency({b: (lambda b=b: sess.run(None, {"images": onnx_x[b]}))
                                      for b in BATCHES})})
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
                                          for b in BATCHES})})
    return rows


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"kdig_study": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "opset": str(OPSET)}


def _fmt_row(r: dict[str, Any]) -> str:
    size = f"{r['bytes'] / 1e6:.2f} MB" if r["bytes"] else "-"
    acc = f"{r['test_acc']:.2%}"
    rob = "n/a" if r["robust_test_acc"] is None else f"{r['robust_test_acc']:.2%}"
    lat = "  ".join(f"b{b} {r['latency'][f'b{b}']['median_ms']:.2f}/"
                    f"{r['latency'][f'b{b}']['p90_ms']:.2f} ms" for b in BATCHES)
    return f"  {r['model']:<8}{r['format']:<64}{size:>9}{acc:>9}{rob:>9}  {lat}"


def main() -> int:
    args = _parser().parse_args()
    cfg = load_from_args(args)
    require_deploy()
    quiet_optuna_logs()
    url = args.storage or default_url()
    storage = open_storage(url)
    name = args.study_name or f"{cfg.name}-{cfg.scale}"
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise KdigError(f"no study '{name}' in {url}: run `python -m kdig_study.optimize "
                        f"--study {cfg.name} --scale {cfg.scale}` first") from None
    if study.user_attrs.get("config_fingerprint") not in (None, cfg.fingerprint()):
        raise KdigError(f"study '{name}' in {url} was made with another config than "
                        f"{cfg.source} at scale {cfg.scale}; give the same --study, --scale "
                        f"and --set as the search")
    trial = pick_trial(study, args.trial)
    ctx = Context.create(cfg, args.data_dir, "cpu", progress=not args.no_progress)
    student = student_weights(study, trial, cfg, len(ctx.data.classes))
    out_dir = Path(args.out) if args.out else exports_dir() / safe_name(name)
    threads = default_threads()
    print(f"exporting trial {trial.number} of '{name}' (val acc {trial.values[0]:.2%}) to "
          f"{out_dir}; {threads} threads", flush=True)
    rows = measure_role("student", student, ctx, out_dir, args.int8, not args.no_compile,
                        threads, int8_activations=args.int8_activations)
    teacher_cached = teacher_path(teacher_fingerprint(cfg, ctx.data, ctx.device)).is_file()
    if not args.no_teacher and teacher_cached:
        rows += measure_role("teacher", ctx.teacher().model, ctx, out_dir, args.int8,
                             not args.no_compile, threads,
                             int8_activations=args.int8_activations)
    elif not args.no_teacher:
        print("teacher: not in the cache; exported the student only", flush=True)
    record = {"study": name, "trial": trial.number, "params": dict(trial.params),
              "val_acc": trial.values[0], "test_acc": trial.user_attrs.get("test_acc"),
              "scale": cfg.scale, "input": "float32 images in [0, 1], NCHW, 3x32x32; "
              "normalisation inside the graph", "threads": threads, "versions": _versions(),
              "rows": rows}
    write_json(out_dir / "export.json", record)
    study.set_user_attr("deployment", {k: v for k, v in record.items() if k != "versions"}
                        | {"versions": record["versions"], "folder": str(out_dir)})
    print(f"  {'model':<8}{'format':<64}{'size':>9}{'test':>9}{'robust':>9}  "
          f"latency median/p90 (batch 1, batch 128)")
    for r in rows:
        print(_fmt_row(r))
    for r in rows:
        if "delta_test_acc" in r:
            d_rob = r["delta_robust_test_acc"]
            print(f"  {r['model']} int8 vs fp32: test accuracy {100 * r['delta_test_acc']:+.2f} "
                  f"points, under corruptions "
                  + ("n/a" if d_rob is None else f"{100 * d_rob:+.2f} points")
                  + f"; size {r['bytes'] / next(x['bytes'] for x in rows if x['model'] == r['model'] and x['format'] == 'ONNX Runtime fp32'):.2f}x")
    print(f"written: {out_dir / 'export.json'}")
    return 0


if __name__ == "__main__":
    run(main)
