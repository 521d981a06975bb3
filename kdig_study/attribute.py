"""Precompute the teacher's Integrated-Gradients maps for a study's training images.

    python -m kdig_study.attribute --study kd_ig --scale cpu
    python -m kdig_study.attribute --study kd_ig --scale cpu --steps 64

Trains or loads the teacher, then computes (or finds) the map store: every step count the
study may use (its default and its search choices) in one pass when the rule nests.
Interrupt it at any time: a restart goes on from the last finished chunk.
"""

from __future__ import annotations

import argparse

from kdig_study.cli import Parser, add_study_args, load_from_args, run
from kdig_study.errors import KdigError
from kdig_study.experiment import Context, ig_counts


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kdig_study.attribute", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p)
    p.add_argument("--steps", type=int, default=None,
                   help="compute this one step count instead of the study's set")
    p.add_argument("--preview", type=int, default=8, metavar="N",
                   help="images in the preview grid (0: none)")
    return p


def main() -> int:
    args = _parser().parse_args()
    cfg = load_from_args(args)
    if args.steps is not None and args.steps < 1:
        raise KdigError(f"--steps {args.steps}: allowed: >= 1")
    ctx = Context.create(cfg, args.data_dir, args.device, progress=not args.no_progress)
    counts = (args.steps,) if args.steps else ig_counts(cfg)
    teacher = ctx.teacher()
    print(f"teacher {'trained now' if teacher.trained_now else 'from cache'}: {teacher.path} "
          f"(test acc {teacher.meta['test_acc']:.2%})")
    spec = ctx.map_spec(counts)
    print(f"IG: {spec.n_images:,} images, {cfg.ig.method} rule, steps {list(counts)}, "
          f"{cfg.ig.baseline} baseline, {spec.precision}, device {ctx.device}", flush=True)
    report = ctx.maps(counts)
    store = report.store
    if report.computed_images:
        rate = report.computed_images / report.seconds
        print(f"computed {report.computed_images:,} maps in {report.seconds:.1f} s "
              f"({rate:.1f} images/s)")
    else:
        print(f"store already complete: {report.seconds:.2f} s, no IG computed")
    for steps in store.counts:
        g = store.gap(steps)
        # (the max is dominated by images where f(x) is close to f(baseline); it is kept in
        # the store's meta.json)
        print(f"  steps {steps}: completeness gap median {g['median']:.3%}, p90 {g['p90']:.3%}")
    if args.preview > 0:
        steps = cfg.ig.steps if cfg.ig.steps in store.counts else store.counts[-1]
        print(f"preview: {ctx.preview(store, steps, args.preview)}")
    print(f"map store: {store.root}")
    return 0


if __name__ == "__main__":
    run(main)
