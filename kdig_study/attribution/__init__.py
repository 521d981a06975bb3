"""Attribution maps: computing them, storing them, and checking them.

* :mod:`~kdig_study.attribution.numerics`: Integrated Gradients itself: quadrature rules
  (Captum's, our nested trapezoid, Clenshaw-Curtis), baselines, channel reduction, the
  frozen-model context, the shared gradient pass, the batched integrator over several step
  counts, and the relative completeness gap.
* :mod:`~kdig_study.attribution.adaptive`: IG to a target completeness gap, with per-image
  refinement over the levels of a nested rule.
* :mod:`~kdig_study.attribution.store`: the on-disk map store (spec, key, resumable locked
  writer, checksums) and the builder of the teacher's IG maps.
* :mod:`~kdig_study.attribution.sources`: the other map sources through the same store: the
  shuffled and smooth-random controls, Captum's other attribution methods.
* :mod:`~kdig_study.attribution.deletion`: the deletion-curve sanity check of a map source.

Dependencies run one way: numerics <- adaptive <- store <- sources; deletion needs only the
model. Import from the submodules; this package imports nothing itself, so loading one
submodule does not load the others.
"""
