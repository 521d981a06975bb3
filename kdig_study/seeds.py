"""Seeds: one independent random stream per purpose, and the seeds ablation replicates use.

docs/design.md, section 9, rule 1: switching a factor on must not shift any other random
stream, so every purpose (data order and crops, overlay draws, random maps, map derangement,
a sampler in one worker process) gets its own generator, seeded from the run's seed and the
purpose's name. A hash, not ``seed + k``: neighbouring run seeds must not share streams.
"""

from __future__ import annotations

import hashlib

# Ablation replicate r trains at student_train.seed + ABLATION_SEED_OFFSET + r. Search trials
# train at student_train.seed itself, so no replicate is ever a run the search selected on
# its own luck (issue: seed reuse). Far enough that a search at another seed stays clear too.
ABLATION_SEED_OFFSET = 1000


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose`` (e.g. "overlay") of the run seeded ``seed``."""
    digest = hashlib.sha256(f"kdig:{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def ablation_seed(base: int, replicate: int) -> int:
    """The student seed of ablation replicate ``replicate`` (0-based)."""
    return base + ABLATION_SEED_OFFSET + replicate


def sampler_seed(study_seed: int, worker: int | None, trials_before: int) -> int:
    """The sampler seed of one search process.

    A single process starting an empty study uses the study's seed itself (reproducible);
    each worker process, and each re-run that resumes a study holding trials, gets its own
    seed derived from (study seed, worker index, trials already in the study), so workers
    and resumed runs never replay the same random start-up proposals.
    """
    if worker is None and trials_before == 0:
        return study_seed
    return derive_seed(study_seed, f"sampler:{worker}:{trials_before}") % (2 ** 32)
