"""The deployable artifact: a model exported to ONNX (PyTorch's exporter), checked, compared
with PyTorch on a whole split, quantised to int8 by onnxruntime (static, QDQ, per-channel
weights, calibrated on training images), and timed in onnxruntime.

The exported graph takes images in [0, 1] (NCHW float32) and does the data set's mean/std
normalisation itself, so a deployment feeds camera pixels / 255 and needs no other
constants. onnx and onnxruntime come with ``pip install -e ".[deploy]"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdig_study.config import INT8_ACTIVATIONS, default_int8_activations
from kdig_study.errors import KdigError
from kdig_study.models import Net
from kdig_study.paths import atomic_write

OPSET = 18
INSTALL = 'pip install -e ".[deploy]"'


def require_deploy() -> None:
    """One line instead of an ImportError when the extra is not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise KdigError(f"exporting needs onnx, onnxscript and onnxruntime ({e.name} is "
                        f"missing): {INSTALL}") from None


class Deployable(nn.Module):
    """[B, 3, H, W] images in [0, 1] -> logits: normalisation inside the graph."""

    def __init__(self, model: Net, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.model((x01 - self.mean) * self.inv_std)


def export_onnx(model: nn.Module, path: Path, check: Callable[[Path], None] | None = None,
                *, image_size: int) -> None:
    """``model`` (eval, fp32, CPU) to ONNX at ``path``, batch size dynamic, written
    atomically: checked by onnx.checker (or ``check``) on the temporary file before it is
    renamed into place, so a file that fails the check never appears."""
    require_deploy()
    model = model.float().cpu().eval()
    x = torch.rand(2, 3, image_size, image_size)  # the graph's H and W are fixed to these
    batch = torch.export.Dim("batch", min=1, max=4096)

    def write(tmp: Path) -> None:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(tmp), dynamo=True, opset_version=OPSET,
                              input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), verbose=False,
                              external_data=False)  # one self-contained file
        (check or check_onnx)(tmp)

    atomic_write(path, write)


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise KdigError(f"the exported model failed onnx.checker ({str(e).splitlines()[0]}); "
                        f"nothing was written") from None


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _batches(images: torch.Tensor, size: int) -> Iterator[np.ndarray]:
    """uint8 [N, 3, H, W] -> float32 [0, 1] numpy batches."""
    for start in range(0, len(images), size):
        yield (images[start: start + size].float() / 255).numpy()


def ort_logits(sess: Any, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    return np.concatenate([sess.run(None, {"images": x})[0] for x in _batches(images, batch)])


@torch.inference_mode()
def torch_logits(model: nn.Module, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    model = model.float().cpu().eval()
    return np.concatenate([model(torch.from_numpy(x)).float().numpy()
                           for x in _batches(images, batch)])


@dataclass
class Parity:
    agreement: float  # share of images with the same predicted class
    max_abs_logit_diff: float
    n: int


def parity(reference: np.ndarray, other: np.ndarray) -> Parity:
    agree = float((reference.argmax(1) == other.argmax(1)).mean())
    return Parity(agree, float(np.abs(reference - other).max()), len(reference))


def quantize_int8(fp32: Path, out: Path, calibration: torch.Tensor,
                  activations: str | None = None) -> str:
    """Static int8 quantisation (QDQ format, per-channel int8 weights, MinMax calibration)
    on ``calibration`` images (uint8 [N, 3, H, W], training images, never test), written
    atomically and checked. ``activations``: "uint8" or "int8" (default: this machine's
    fast kind, see ``default_int8_activations``). Returns the activation type used."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    activations = activations or default_int8_activations()
    if activations not in INT8_ACTIVATIONS:
        raise KdigError(f"int8 activations {activations!r}: allowed "
                        f"{', '.join(INT8_ACTIVATIONS)}")
    act_type = QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = _batches(calibration, 64)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"images": x}

    def write(tmp: Path) -> None:
        pre = tmp.with_name(tmp.name + ".pre.onnx")
        try:
            # shape inference and graph optimisation first, as onnxruntime recommends
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=act_type,
                            weight_type=QuantType.QInt8,
                            # a BatchNorm not folded into a conv (after a pool) has rank-1
                            # weights whose channel axis is 0, not the default 1 (onnxruntime
                            # warned "Axis 1 is out-of-range" and fell back to per-tensor)
                            extra_options={"QDQOpTypePerChannelSupportToAxis":
                                           {"BatchNormalization": 0}})
        finally:
            pre.unlink(missing_ok=True)
        check_onnx(tmp)

    atomic_write(out, write)
    return activations
