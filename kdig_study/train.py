"""Train one teacher or one student of a study and print what it scores and costs.

    python -m kdig_study.train --study kd_ig --role teacher --scale cpu
    python -m kdig_study.train --study kd_ig --role student --scale cpu --no-ig
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from kdig_study.cli import Parser, add_study_args, load_from_args, run
from kdig_study.config import StudyConfig, method_name
from kdig_study.errors import KdigError
from kdig_study.paths import storage_dir, write_json


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kdig_study.train", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, trains_students=True)
    p.add_argument("--role", required=True, choices=["teacher", "student"])
    for name in ("kd", "ig", "at"):
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None,
                       help=f"student: switch {name.upper()} on/off (default: the study's)")
    p.add_argument("--epochs", type=int, default=None, help="override the role's epochs")
    p.add_argument("--seed", type=int, default=None, help="student: override its seed")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    return p


def _with_overrides(cfg: StudyConfig, args: argparse.Namespace) -> StudyConfig:
    method = cfg.method
    for name in ("kd", "ig", "at"):
        if getattr(args, name) is not None:
            method = dataclasses.replace(method, **{name: getattr(args, name)})
    student_train = cfg.student_train
    teacher_train = cfg.teacher_train
    if args.epochs is not None:
        if args.epochs < 1:
            raise KdigError(f"--epochs {args.epochs}: allowed: >= 1")
        if args.role == "teacher":
            teacher_train = dataclasses.replace(teacher_train, epochs=args.epochs)
        else:
            student_train = dataclasses.replace(student_train, epochs=args.epochs)
    if args.seed is not None:
        student_train = dataclasses.replace(student_train, seed=args.seed)
    return dataclasses.replace(cfg, method=method, student_train=student_train,
                               teacher_train=teacher_train)


def _print_model(name: str, acc: dict[str, float], prof: dict, teacher_params: int) -> None:
    b1, bn = prof["latency_b1"], next(v for k, v in prof.items()
                                       if k.startswith("latency_b") and k != "latency_b1")
    print(f"{name}: val acc {acc['val_acc']:.2%}, test acc {acc['test_acc']:.2%}")
    print(f"  parameters {prof['params']:,} (compression {teacher_params / prof['params']:.3f}x),"
          f" {prof['flops'] / 1e6:.1f} MFLOPs/image, {prof['bytes'] / 1e6:.2f} MB")
    print(f"  latency batch 1: median {b1['median_ms']:.2f} ms, p90 {b1['p90_ms']:.2f} ms; "
          f"batch {bn['batch_size']}: median {bn['median_ms']:.2f} ms, p90 {bn['p90_ms']:.2f} ms")
    print(f"  ({b1['method']})")


def main() -> int:
    args = _parser().parse_args()
    cfg = _with_overrides(load_from_args(args), args)
    from kdig_study.engine import save_checkpoint
    from kdig_study.experiment import Context, run_student
    from kdig_study.measure import profile

    ctx = Context.create(cfg, args.data_dir, args.device, progress=not args.no_progress)
    print(f"study {cfg.name} at scale {cfg.scale}: {ctx.data.describe()}; device "
          f"{ctx.device}")
    teacher = ctx.teacher() if (args.role == "teacher" or cfg.method.kd or cfg.method.at) \
        else None
    out: dict = {"study": cfg.name, "scale": cfg.scale, "role": args.role}
    if teacher is not None:
        t_prof = profile(teacher.model, ctx.device, batch=cfg.student_train.batch_size,
                         how=cfg.measure, image_size=ctx.data.image_size)
        state = "trained now" if teacher.trained_now else "loaded from cache"
        print(f"teacher {state}: {teacher.path} "
              f"({teacher.meta['wall_s'] / 60:.1f} min to train)")
        _print_model("teacher", teacher.meta, t_prof, t_prof["params"])
        out["teacher"] = {"path": str(teacher.path), **teacher.meta, **t_prof}
    if args.role == "student":
        run_ = run_student(ctx, cfg)
        m = run_.metrics
        t_params = m.params * m.compression
        s_prof = profile(run_.model, ctx.device, batch=cfg.student_train.batch_size,
                         how=cfg.measure, image_size=ctx.data.image_size)
        mode = method_name(cfg.method)
        _print_model(f"student ({mode})", m.stored(), s_prof, round(t_params))
        print(f"  {m.epochs_run} epochs in {run_.result.wall_s / 60:.1f} min "
              f"({m.train_images_per_s:.0f} img/s)")
        steps = m.teacher_steps_cached + m.teacher_steps_computed
        if steps:
            print(f"  teacher outputs: {m.teacher_steps_cached:,} of {steps:,} KD/AT steps "
                  f"read from the cache")
        ckpt = storage_dir() / "checkpoints" / \
            f"{cfg.name}-{cfg.scale}-{mode.lower()}-seed{cfg.student_train.seed}.safetensors"
        save_checkpoint(ckpt, run_.result.state, {"config": cfg.to_dict(), **m.to_dict()})
        print(f"  checkpoint: {ckpt}")
        out["student"] = {"checkpoint": str(ckpt), **m.to_dict(), **s_prof}
    if args.json:
        write_json(Path(args.json), out)
    return 0


if __name__ == "__main__":
    run(main)
