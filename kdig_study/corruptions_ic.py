"""The ImageNet-C corruptions of Hendrycks & Dietterich (ICLR 2019), as the `imagecorruptions`
package implements them (the `corruptions` extra), named ``ic_<name>`` in
``robustness.corruptions``: shot noise, defocus, motion and zoom blur, snow, frost,
elastic transform, pixelate, spatter and the rest, beside the suite's own five.

Their parameters are ImageNet-C's, set for 224 px images; on 32 px images the blurs and
weather are relatively stronger (CIFAR-10-C re-tuned them). Our severities 1, 2, 3 are the
package's 1, 3 and 5 (its lowest, middle and highest).

The package (1.1.2, unmaintained) needs setuptools' pkg_resources, and some of its
corruptions fail on today's NumPy and scikit-image (glass_blur, gaussian_blur, fog: removed
arguments and aliases). Each name is tried once on a small image when a study names it, so a
broken one is refused in one line before anything runs, not after a teacher has trained.
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from kdig_study.errors import KdigError

if TYPE_CHECKING:  # (torch stays out of the config's imports)
    import torch

PREFIX = "ic_"
SEVERITY = (1, 3, 5)  # the package's severity for ours 1, 2, 3
MIN_SIZE = 32  # px: the package refuses smaller images
_INSTALL = "pip install -e '.[corruptions]'"


def is_ic(name: str) -> bool:
    return name.startswith(PREFIX)


def _package() -> Any:
    try:
        import imagecorruptions
    except ImportError as e:
        raise KdigError(f"the ic_ corruptions need the imagecorruptions package ({e}); "
                        f"install the extra: {_INSTALL}") from None
    return imagecorruptions


@contextlib.contextmanager
def _numpy_random_kept() -> Iterator[None]:
    """NumPy's global generator as it was, after the package has drawn from it."""
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


def version() -> str:
    from importlib.metadata import version as of

    return of("imagecorruptions")


@functools.cache
def check(name: str) -> None:
    """One line, unless ``name`` (``ic_<name>``) is a corruption of the package that runs
    here."""
    ic = _package()
    known = ic.get_corruption_names("all")
    base = name.removeprefix(PREFIX)
    if base not in known:
        raise KdigError(f"robustness.corruptions: unknown corruption {name!r}; allowed ic_ "
                        f"names: {', '.join(PREFIX + k for k in known)}")
    try:
        with _numpy_random_kept():
            ic.corrupt(np.full((32, 32, 3), 128, np.uint8), corruption_name=base, severity=1)
    except Exception as e:  # the package fails with several types on today's libraries
        why = " ".join(str(e).split())  # one line, whatever the package's message
        raise KdigError(f"robustness.corruptions: {name} fails in imagecorruptions "
                        f"{version()} here ({type(e).__name__}: {why}); leave it out") from None


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, H, W] under ``ic_<name>`` at our severity 1..3,
    deterministic under ``seed``: the package draws from NumPy's global generator, seeded
    here per image and corruption (two noises never share their draws) and restored after."""
    import torch

    check(name)
    if min(images.shape[-2:]) < MIN_SIZE:
        raise KdigError(f"robustness.corruptions: {name} needs images of {MIN_SIZE} px or more "
                        f"(these are {images.shape[-1]} px); leave the ic_ corruptions out")
    ic, base = _package(), name.removeprefix(PREFIX)
    stream = zlib.crc32(base.encode())
    out = []
    with _numpy_random_kept():
        for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):  # [H, W, 3] uint8
            np.random.seed((stream + seed * 1_000_003 + severity * 10_007 + i) % 2 ** 32)
            x = ic.corrupt(img, corruption_name=base, severity=SEVERITY[severity - 1])
            out.append(np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, 255)
                       .astype(np.uint8).reshape(img.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
