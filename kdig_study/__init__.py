"""kdig_study: knowledge distillation with Integrated-Gradients overlays, as a study harness."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kdig_study")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
