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
import shutil
from pathlib import Path
from typing import Any

from kdig_study import __version__
from kdig_study.cli import Parser, add_study_args, load_from_args, run
from kdig_study.config import DEPLOY_BATCHES, INT8_ACTIVATIONS, default_int8_activations
from kdig_study.errors import KdigError
from kdig_study.paths import safe_name, storage_dir, write_json


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kdig_study.export", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, device=False)  # measured where it deploys: on the CPU
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


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    from kdig_study.deploy import OPSET

    return {"kdig_study": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "opset": str(OPSET)}


def publish_folder(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``staging`` whole. A kill between the two renames leaves the
    previous set under ``.NAME.old`` and no half-mixed folder; the next export removes it."""
    old = out_dir.parent / f".{out_dir.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _fmt_row(r: dict[str, Any]) -> str:
    size = f"{r['bytes'] / 1e6:.2f} MB" if r["bytes"] else "-"
    acc = f"{r['test_acc']:.2%}"
    rob = "n/a" if r["robust_test_acc"] is None else f"{r['robust_test_acc']:.2%}"
    lat = "  ".join(f"b{b} {r['latency'][f'b{b}']['median_ms']:.2f}/"
                    f"{r['latency'][f'b{b}']['p90_ms']:.2f} ms" for b in DEPLOY_BATCHES)
    return f"  {r['model']:<8}{r['format']:<64}{size:>9}{acc:>9}{rob:>9}  {lat}"


def main() -> int:
    args = _parser().parse_args()
    cfg = load_from_args(args)
    import optuna

    from kdig_study.deploy import require_deploy
    from kdig_study.deploy_measure import measure_role
    from kdig_study.experiment import Context
    from kdig_study.measure import default_threads
    from kdig_study.store import default_url, open_storage, quiet_optuna_logs
    from kdig_study.teacher import cached_teacher
    from kdig_study.trials import pick_trial, student_weights

    require_deploy()
    quiet_optuna_logs()
    url = args.storage or default_url()
    storage = open_storage(url, existing=True)
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
    # The export is written as a set: into a staging folder, provenance last, then swapped
    # in whole. Written in place, a kill left one trial's student.onnx beside an
    # export.json naming another, and an export without --int8 kept an older int8 file.
    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rows = measure_role("student", student, ctx, staging, args.int8, not args.no_compile,
                        threads, int8_activations=args.int8_activations)
    # the teacher as the study trained it: at the precision the study recorded, which may
    # not be what "auto" resolves to on this CPU (a study searched on a GPU)
    made_at = study.user_attrs.get("precision", {}).get("teacher")
    teacher = None if args.no_teacher else cached_teacher(cfg, ctx.data, ctx.device, made_at)
    if teacher is not None:
        rows += measure_role("teacher", teacher.model, ctx, staging, args.int8,
                             not args.no_compile, threads,
                             int8_activations=args.int8_activations)
    elif not args.no_teacher:
        print("teacher: not in the cache; exported the student only", flush=True)
    record = {"study": name, "trial": trial.number, "params": dict(trial.params),
              "val_acc": trial.values[0], "test_acc": trial.user_attrs.get("test_acc"),
              "scale": cfg.scale, "input": "float32 images in [0, 1], NCHW, 3x32x32; "
              "normalisation inside the graph", "threads": threads, "versions": _versions(),
              "rows": rows}
    write_json(staging / "export.json", record)
    publish_folder(staging, out_dir)
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
