"""Precompute the teacher's maps for a study's training images, from IG or another source.

    python -m kdig_study.attribute --study kd_ig --scale cpu
    python -m kdig_study.attribute --study kd_ig --scale cpu --source all
    python -m kdig_study.attribute --study kd_ig --scale cpu --source shuffled,gradcam
    python -m kdig_study.attribute --study kd_ig --scale cpu --steps 64

Trains or loads the teacher, then computes (or finds) each source's map store: IG at every
step count the study may use (its default and its search choices) in one pass when the rule
nests; shuffled and random maps from those IG maps; Captum's methods on the same teacher.
For each source it prints the time, the completeness gap (IG), and a sanity check: the
deletion curve of the first 256 images (the teacher's true-class probability as the
top-ranked pixels are removed) against random pixel order. A faithful map drops the
probability faster (smaller area); shuffled and random maps should do no better than random
order. Interrupt it at any time: a restart goes on from the last finished chunk.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from kdig_study.cli import Parser, add_study_args, load_from_args, run
from kdig_study.config import MAP_SOURCES, MAX_IG_STEPS
from kdig_study.errors import KdigError
from kdig_study.paths import cache_dir, writable_folder, write_json

if TYPE_CHECKING:
    from kdig_study.attribution.store import MapStore
    from kdig_study.experiment import Context

SANITY_IMAGES = 256


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kdig_study.attribute", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p)
    p.add_argument("--source", default=None,
                   help=f"comma list of map sources, or all ({', '.join(MAP_SOURCES)}); "
                        f"default: the study's ig.source")
    p.add_argument("--steps", type=int, default=None,
                   help="compute this one IG step count instead of the study's set")
    p.add_argument("--preview", type=int, default=8, metavar="N",
                   help="images in each preview grid (0: none)")
    p.add_argument("--no-sanity", action="store_true", help="skip the deletion-curve check")
    return p


def parse_sources(text: str | None, default: str) -> list[str]:
    if text is None:
        return [default]
    if text.strip() == "all":
        return list(MAP_SOURCES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in MAP_SOURCES]
    if bad or not names:
        raise KdigError(f"--source {text}: unknown source "
                        f"{', '.join(repr(b) for b in bad) or '(none given)'}; allowed: "
                        f"{', '.join(MAP_SOURCES)} or all")
    return list(dict.fromkeys(names))


def sanity(ctx: Context, store: MapStore, steps: int) -> dict[str, Any]:
    """The deletion-curve check of a store (cached beside it)."""
    import torch

    from kdig_study.attribution.deletion import area, deletion_curve

    path = store.root / f"deletion_s{store.variant(steps)}_n{SANITY_IMAGES}.json"
    try:
        cached = json.loads(path.read_text())
        # (older checks lack the other-images reference; a damaged file is computed again)
        if isinstance(cached, dict) and isinstance(cached.get("ratio_other"), float):
            return cached
    except (OSError, ValueError):
        pass
    train_set, _ = ctx.data.train_subset(ctx.cfg.student_train.train_size)
    n = min(SANITY_IMAGES, len(train_set))
    maps = torch.from_numpy(store.maps(steps)[:n].astype("float32"))
    teacher = ctx.teacher().model
    args = (teacher, train_set.images[:n], train_set.labels[:n], maps, ctx.data.mean,
            ctx.data.std, ctx.device)
    f, by_map = deletion_curve(*args, order="map")
    _, by_random = deletion_curve(*args, order="random")
    _, by_other = deletion_curve(*args, order="other")
    out = {"images": n, "fractions": f, "by_map": by_map, "by_random": by_random,
           "by_other": by_other, "area_map": area(f, by_map),
           "area_random": area(f, by_random), "area_other": area(f, by_other)}
    out["ratio"] = out["area_map"] / max(out["area_random"], 1e-12)
    out["ratio_other"] = out["area_map"] / max(out["area_other"], 1e-12)
    write_json(path, out)
    return out


def main() -> int:
    args = _parser().parse_args()
    cfg = load_from_args(args)
    if args.steps is not None and not 1 <= args.steps <= MAX_IG_STEPS:
        raise KdigError(f"--steps {args.steps}: allowed: 1 to {MAX_IG_STEPS} (as ig.steps)")
    sources = parse_sources(args.source, cfg.ig.source)
    # maps, previews and deletion checks are written to the cache: a read-only one was found
    # only after the work was done
    writable_folder(cache_dir(), "cache folder (KDIG_CACHE)")
    from kdig_study.attribution.sources import uses_steps
    from kdig_study.attribution.store import gap_summary
    from kdig_study.experiment import Context, ig_counts

    ctx = Context.create(cfg, args.data_dir, args.device, progress=not args.no_progress)
    counts = (args.steps,) if args.steps else ig_counts(cfg)
    teacher = ctx.teacher()
    print(f"teacher {'trained now' if teacher.trained_now else 'from cache'}: {teacher.path} "
          f"(val acc {teacher.meta['val_acc']:.2%}, test acc {teacher.meta['test_acc']:.2%})")
    spec = ctx.map_spec(counts)
    print(f"maps of {spec.n_images:,} images; IG: {cfg.ig.method} rule, steps {list(counts)}, "
          f"{cfg.ig.baseline} baseline, {spec.precision}, device {ctx.device}", flush=True)
    steps = cfg.ig.steps if cfg.ig.steps in counts else counts[-1]
    rows = []
    for source in sources:
        t0 = time.perf_counter()
        report = ctx.maps(counts, source)
        seconds = time.perf_counter() - t0
        store = report.store
        if report.computed_images:
            print(f"{source}: computed {report.computed_images:,} maps in {seconds:.1f} s "
                  f"({report.computed_images / seconds:.1f} images/s)")
        else:
            print(f"{source}: store already complete ({seconds:.2f} s, nothing computed)")
        if source == "ig" and store.counts == (0,):
            print(f"  {gap_summary(store)}")
        elif source == "ig":
            for s in store.counts:
                g = store.gap(s)
                # (the max is dominated by images where f(x) is close to f(baseline); it is
                # kept in the store's meta.json)
                print(f"  steps {s}: completeness gap median {g['median']:.3%}, "
                      f"p90 {g['p90']:.3%}")
        for k, v in store.meta.get("measured", {}).items():
            if "autocorrelation" in k:
                print(f"  {k.replace('_', ' ')}: {v:.2f} px")
        if args.preview > 0:
            print(f"  preview: {ctx.preview(store, steps, args.preview)}")
        if not args.no_sanity:
            d = sanity(ctx, store, steps)
            print(f"  deletion check ({d['images']} images"
                  + (f", {steps} steps" if uses_steps(source) else "") + f"): area "
                  f"{d['area_map']:.3f} removing top-ranked pixels first vs {d['area_random']:.3f}"
                  f" in random order: ratio {d['ratio']:.2f}; vs {d['area_other']:.3f} by "
                  f"other images' maps: ratio {d['ratio_other']:.2f} (< 1: the map finds "
                  f"what the teacher uses)")
            rows.append((source, seconds, report.computed_images, d["ratio"],
                         d["ratio_other"]))
        print(f"  map store: {store.root}", flush=True)
    if len(rows) > 1:
        print("source            seconds   maps   deletion ratio: vs random order, "
              "vs other images' maps")
        for source, seconds, n, ratio, ratio_other in rows:
            print(f"{source:<16}{seconds:>9.1f}{n:>7}{ratio:>17.2f}{ratio_other:>23.2f}")
    return 0


if __name__ == "__main__":
    run(main)
