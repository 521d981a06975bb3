"""One training loop for every mode: teacher, student alone, KD, attention transfer, and the
IG overlay (which arrives through the loader). It knows nothing of Optuna: a per-epoch
callback may raise to stop early (pruning), and the exception passes through."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kdig_study.checkpoint import Resume
from kdig_study.config import KDConfig, TrainConfig
from kdig_study.data import BatchLoader, DataBundle, ImageSet, Overlay
from kdig_study.errors import KdigError
from kdig_study.losses import at_loss_to, attention_map, distill_loss
from kdig_study.models import Net, init_whitening, whitening_conv
from kdig_study.paths import atomic_write, write_json
from kdig_study.teacher_outputs import EpochOutputs, TeacherOut, TeacherStream

EVAL_BATCH = 1000


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; or an explicit 'cpu', 'cuda', 'cuda:1'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdigError(f"--device {name!r}: allowed: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KdigError(f"--device {name}: no CUDA device on this machine; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KdigError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":  # mps, xpu, meta, ...: the harness runs on CPU and CUDA only
        raise KdigError(f"--device {name}: allowed: auto, cpu, cuda, cuda:N")
    return device


@dataclass(frozen=True)
class Distillation:
    """What a student learns from besides its labels."""

    teacher: Net
    kd: KDConfig | None = None  # None: no KD term
    at_weight: float = 0.0  # 0: no attention-transfer term
    tap: int | str = -1  # the student's tap: a features index, or a module path (at_layer)
    teacher_tap: int | str | None = None  # the teacher's, where it differs (None: ``tap``)
    outputs: TeacherStream | None = None  # the teacher-output cache of this run's stream

    @property
    def use_at(self) -> bool:
        return self.at_weight > 0

    @property
    def tap_of_teacher(self) -> int | str:
        return self.tap if self.teacher_tap is None else self.teacher_tap


@dataclass
class EpochStats:
    epoch: int  # 1-based
    loss: float
    train_acc: float
    val_acc: float
    lr: float
    seconds: float  # the training pass
    images_per_s: float
    val_seconds: float = 0.0  # the validation pass


@dataclass
class TrainResult:
    val_acc: float  # best epoch's validation accuracy
    test_acc: float  # test accuracy of the best epoch's weights (nan if not evaluated)
    best_epoch: int
    epochs_run: int
    wall_s: float  # training with its per-epoch validation
    images_per_s: float  # training throughput, median over epochs
    precision: str  # resolved: fp32 or bf16
    test_s: float = 0.0  # the final test evaluation
    teacher_steps_cached: int = 0  # KD/AT steps whose teacher outputs were read
    teacher_steps_computed: int = 0  # KD/AT steps that ran the teacher
    history: list[EpochStats] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # best weights, on the CPU


EpochCallback = Callable[[EpochStats], None]


class Lookahead:
    """airbench's lookahead averaging of the weights (and BN statistics): from step
    ``start`` on, every ``every`` steps, average <- lerp(average, weights, 1 - rho) and the
    weights are set to the average, with rho = decay^every * (step / steps)^3 rising towards
    the end of training (move fast early, average strongly late)."""

    def __init__(self, model: Net, steps: int, start: float, every: int = 5,
                 decay: float = 0.95) -> None:
        self.model, self.steps, self.every = model, steps, every
        self.start = int(start * steps)
        self.base = decay ** every
        self.average: list[torch.Tensor] | None = None

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in self.model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def step(self, step: int) -> None:
        if step < self.start or step % self.every:
            return
        if self.average is None:
            self.average = [t.detach().clone() for t in self._tensors()]
            return
        self._update(self.base * (step / self.steps) ** 3)

    @torch.no_grad()
    def _update(self, rho: float) -> None:
        assert self.average is not None
        for avg, t in zip(self.average, self._tensors(), strict=True):
            avg.lerp_(t, 1 - rho)
            t.copy_(avg)

    def end_of_epoch(self) -> None:
        """The weights evaluated at the end of an epoch are the average."""
        if self.average is not None:
            self._update(1.0)


def seeded_model(build: Callable[[], Net], seed: int) -> Net:
    """Build a model under a seed, so its initial weights are reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _param_groups(model: Net, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters; BatchNorm biases in a group of their own at bias_lr_scale x the
    learning rate and weight decay / bias_lr_scale (the same decay per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.bias_lr_scale == 1.0:
        return [{"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    bn_bias = {id(m.bias) for m in model.modules()
               if isinstance(m, torch.nn.BatchNorm2d) and m.bias is not None}
    biases = [p for p in params if id(p) in bn_bias]
    rest = [p for p in params if id(p) not in bn_bias]
    return [{"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": biases, "lr": cfg.lr * cfg.bias_lr_scale,
             "weight_decay": cfg.weight_decay / cfg.bias_lr_scale}]


def make_optimizer(model: Net, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over ``model``'s parameter groups."""
    groups = _param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr)


def plain_steps(model: torch.nn.Module, opt: torch.optim.Optimizer,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]], precision: str,
                device: torch.device) -> None:
    """One plain training step per (images, labels) batch: forward, cross-entropy on fp32
    logits, backward, optimizer step, nothing else (the compute the benchmarks and the
    device check time); waits for the GPU at the end."""
    for x, y in batches:
        with autocast(precision, device):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def triangle(step: int, steps: int, start: float = 0.2, peak_at: float = 0.23,
             end: float = 0.07) -> float:
    """airbench's learning-rate factor: linear from ``start`` to 1 at ``peak_at`` of the
    steps, then linear down to ``end`` at the last step."""
    peak = max(1, int(peak_at * steps))
    if step <= peak:
        return start + (1 - start) * step / peak
    return 1 + (end - 1) * (step - peak) / max(1, steps - peak)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int
               ) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.schedule == "onecycle":
        # OneCycleLR divides by the length of each phase: a warm-up of 0.25 x steps must
        # span at least one step (4 steps in all gave a ZeroDivisionError), and too short a
        # run for both phases trains at a constant rate.
        if steps <= 2:
            return None
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps,
            pct_start=max(0.25, 2 / steps))
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if cfg.schedule == "triangle":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: triangle(i, steps))
    return None


def cpu_bf16_kernels() -> str | None:
    """Which kind of fast-bf16 CPU this is, by its flags: "amx" (Intel AMX), "avx512_fp16"
    (AVX512-BF16 with AVX512-FP16 and no AMX: an Intel Xeon with AMX off, which oneDNN
    calls AVX 10.1) or "avx512_bf16" (AVX512-BF16 alone, e.g. AMD Zen 4); None with none.
    bf16 training rounds differently on each: the cpu-scale teacher recipe trained to three
    different files on the three (test 89.69% on AMX, 89.90% on AVX512-FP16, 89.65% on an
    AMD EPYC), each reproduced bit for bit on its own kind, so bf16 runs made on one cannot
    be pooled with another's. (oneDNN runs the same avx512_core_bf16 convolutions on both
    AVX512-BF16 kinds: where their bits part is not known, only that they do.)"""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_fp16" if "avx512_fp16" in flags else "avx512_bf16"
    return None


def bf16_kernels(precision: str, device: torch.device) -> str | None:
    """The CPU bf16 kernel family a run at resolved ``precision`` uses here (recorded with
    each ablation run, so that a ledger's runs are matched to a machine before anything is
    trained); None off the CPU or at fp32."""
    return cpu_bf16_kernels() if precision == "bf16" and device.type == "cpu" else None


def _cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: compute capability 8 (Ampere) or later, asked of this device.
    torch's is_bf16_supported() also says True where bf16 is only emulated (e.g. a T4 or
    V100), which runs slower than fp32, and it asks about the current device, not this one.
    ROCm GPUs that run torch have bf16."""
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where bfloat16 autocast is fast (CUDA GPUs with native bf16; CPUs
    with AMX or AVX512-BF16), else 'fp32'. `bench --only precision` measures the choice: on
    AMX a training step runs 1.75-3.41x faster under bf16 (both cpu-scale families); on an
    AVX512-FP16 CPU with AMX off, bf16 may be the slower (unconfirmed; docs/results.md)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if _cuda_has_native_bf16(device) else "fp32"
    return "bf16" if cpu_bf16_kernels() is not None else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for a resolved precision: bf16 needs no loss scaling."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict(model: Net, images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
            device: torch.device, batch_size: int = EVAL_BATCH, precision: str = "fp32"
            ) -> torch.Tensor:
    """Predicted labels ([N]) for uint8 images ([N, 3, 32, 32]) in eval mode."""
    was_training = model.training
    model.eval()
    loader = BatchLoader(ImageSet(images, torch.zeros(len(images), dtype=torch.long)),
                         batch_size=batch_size, mean=mean, std=std, device=device)
    preds = []
    with autocast(precision, device):
        for batch in loader:
            preds.append(model(batch.x).argmax(1))
    model.train(was_training)
    return torch.cat(preds).cpu()


def evaluate(model: Net, data: ImageSet, mean: tuple[float, ...], std: tuple[float, ...],
             device: torch.device, precision: str = "fp32") -> float:
    """Accuracy on a labelled set, in [0, 1]."""
    pred = predict(model, data.images, mean, std, device, precision=precision)
    return (pred == data.labels).float().mean().item()


def train(model: Net, train_set: ImageSet, data: DataBundle, cfg: TrainConfig, *,
          device: torch.device, distill: Distillation | None = None,
          planes: torch.Tensor | None = None, overlay: Overlay | None = None,
          on_epoch: EpochCallback | None = None, evaluate_test: bool = True,
          progress: bool = True, desc: str = "train", resume: Resume | None = None
          ) -> TrainResult:
    """Train ``model`` on ``train_set``; validate every epoch; test the best epoch's weights.

    ``planes`` ([N, P, 32, 32], aligned with ``train_set``) are cropped and flipped with their
    images and handed to ``overlay``; a KD teacher sees the clean augmented image.
    ``resume``: checkpoint at the end of epochs (after ``on_epoch``: an epoch whose report
    was interrupted is run again, never left unreported) and go on from the last checkpoint
    of the same run, ending with the weights and metrics the run would have had
    uninterrupted. ``on_epoch`` is not called again for the epochs a checkpoint restored.
    """
    torch.manual_seed(cfg.seed)
    precision = resolve_precision(cfg.precision, device)
    model.to(device).to(memory_format=torch.channels_last)
    loader = BatchLoader(train_set, batch_size=cfg.batch_size, mean=data.mean, std=data.std,
                         device=device, train=True, pad=data.pad if cfg.pad < 0 else cfg.pad,
                         flip=data.flip,
                         seed=cfg.seed, planes=planes, overlay=overlay,
                         drop_last=len(train_set) > cfg.batch_size)
    steps = cfg.epochs * len(loader)
    if whitening_conv(model) is not None:
        # the whitening stem is set once from (up to 5,000 of) this run's training images
        sample = train_set.images[:5000].to(device).float().div(255)
        init_whitening(model, (sample - loader.mean) * loader.inv_std)
    lookahead = Lookahead(model, steps, cfg.ema_start) if cfg.ema else None
    opt = make_optimizer(model, cfg)
    sched = _scheduler(opt, cfg, steps)
    teacher = distill.teacher.to(device).eval() if distill else None
    # torch.compile shares the module's parameters: training steps run the compiled graph,
    # evaluation (other batch shapes) stays eager. Attention transfer taps a block through
    # forward_tap, which stays eager too.
    fwd: Net = torch.compile(model) if cfg.compile else model  # type: ignore[assignment]
    if cfg.compile and teacher is not None:
        teacher = torch.compile(teacher)  # type: ignore[assignment]
    run = _RunState()
    if resume is not None:
        stored = resume.load()
        if stored is not None:
            run = _restore(stored, model, opt, sched, lookahead, loader, device)
            resume.log(f"resumed {desc} from epoch {run.epoch + 1} of {cfg.epochs} (epochs "
                       f"1-{run.epoch} from its checkpoint)" if run.epoch < cfg.epochs else
                       f"resumed {desc} after its last epoch ({cfg.epochs}, from its "
                       f"checkpoint): testing", flush=True)
    history, step = run.history, run.step

    def teacher_read() -> int:  # steps served by the teacher-output cache, every sitting
        return run.teacher_read + (distill.outputs.served
                                   if distill is not None and distill.outputs else 0)

    best_acc, best_epoch, best_state = run.best_acc, run.best_epoch, run.best_state
    last_write = time.monotonic()
    start = time.perf_counter() - run.wall_s
    bar = tqdm(total=steps, initial=step, desc=desc, unit="step", disable=not progress,
               mininterval=0.5, dynamic_ncols=True, leave=False)
    try:
        for epoch in range(run.epoch + 1, cfg.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            cached: EpochOutputs | None = None
            if distill is not None and distill.outputs is not None:
                cached = distill.outputs.open_epoch(epoch, loader.n)
            for batch in loader:
                t_out = None
                if distill is not None and teacher is not None:
                    compute = functools.partial(teacher_forward, teacher, batch.x_clean,
                                                distill, precision, device)
                    t_out = compute() if cached is None else \
                        cached.get(batch.index, compute, device)
                loss, logits = _step_loss(fwd, batch.x, batch.y, cfg, distill, t_out,
                                          precision, device, epoch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                if lookahead is not None:
                    lookahead.step(step)
                # Accumulate on the device: no host sync per step.
                loss_sum += loss.detach() * batch.y.numel()
                correct += (logits.detach().argmax(1) == batch.y).sum()
                seen += batch.y.numel()
                bar.update()
            if cached is not None:
                cached.finish()  # before the callback, which may stop the run here
            if lookahead is not None:
                lookahead.end_of_epoch()
            seconds = time.perf_counter() - t0
            val_acc = evaluate(model, data.val, data.mean, data.std, device, precision)
            val_seconds = time.perf_counter() - t0 - seconds
            stats = EpochStats(epoch=epoch, loss=loss_sum.item() / seen,
                               train_acc=correct.item() / seen, val_acc=val_acc,
                               lr=opt.param_groups[0]["lr"], seconds=seconds,
                               images_per_s=seen / seconds, val_seconds=val_seconds)
            history.append(stats)
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
                best_state = {k: v.detach().to("cpu", copy=True)
                              for k, v in model.state_dict().items()}
            bar.set_postfix(epoch=epoch, loss=f"{stats.loss:.3f}", val=f"{val_acc:.3f}",
                            img_s=f"{stats.images_per_s:.0f}")
            if on_epoch is not None:
                on_epoch(stats)
            if resume is not None and (epoch == cfg.epochs or resume.due(epoch, last_write)):
                resume.save(_snapshot(
                    _RunState(epoch, step, best_acc, best_epoch, best_state, history,
                              time.perf_counter() - start, teacher_read()),
                    model, opt, sched, lookahead, loader))
                last_write = time.monotonic()
    finally:
        bar.close()
    wall = time.perf_counter() - start
    model.load_state_dict(best_state)
    t_test = time.perf_counter()
    test_acc = evaluate(model, data.test, data.mean, data.std, device, precision) \
        if evaluate_test else float("nan")
    test_s = time.perf_counter() - t_test
    rates = sorted(h.images_per_s for h in history)
    teacher_steps = step if distill is not None else 0
    read = teacher_read()
    return TrainResult(val_acc=best_acc, test_acc=test_acc, best_epoch=best_epoch,
                       epochs_run=len(history), wall_s=wall, images_per_s=rates[len(rates) // 2],
                       precision=precision, test_s=test_s,
                       teacher_steps_cached=read, teacher_steps_computed=teacher_steps - read,
                       history=history, state=best_state)


@dataclass
class _RunState:
    """Where a run stands at the end of an epoch (what a checkpoint restores beside the
    model, optimizer, scheduler, lookahead and generators)."""

    epoch: int = 0  # epochs done
    step: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[EpochStats] = field(default_factory=list)
    wall_s: float = 0.0  # training and validation so far, over every sitting
    teacher_read: int = 0  # steps whose teacher outputs were read from the cache


def _snapshot(run: _RunState, model: Net, opt: torch.optim.Optimizer,
              sched: torch.optim.lr_scheduler.LRScheduler | None, lookahead: Lookahead | None,
              loader: BatchLoader) -> dict[str, Any]:
    """A checkpoint's content: tensors, numbers, strings, lists and dicts only (it is read
    back with weights_only=True)."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "epoch": run.epoch, "step": run.step, "best_acc": run.best_acc,
        "best_epoch": run.best_epoch, "best_state": run.best_state,
        "history": [dataclasses.asdict(h) for h in run.history], "wall_s": run.wall_s,
        "teacher_read": run.teacher_read,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
        "lookahead": [t.cpu() for t in lookahead.average]
        if lookahead is not None and lookahead.average is not None else None,
        "loader": loader.generator.get_state(), "overlay": loader.overlay_generator.get_state(),
        "rng": rng}


def _restore(state: dict[str, Any], model: Net, opt: torch.optim.Optimizer,
             sched: torch.optim.lr_scheduler.LRScheduler | None, lookahead: Lookahead | None,
             loader: BatchLoader, device: torch.device) -> _RunState:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])  # moves its buffers to the parameters' device
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    if lookahead is not None and state["lookahead"] is not None:
        lookahead.average = [t.to(device) for t in state["lookahead"]]
    loader.generator.set_state(state["loader"])
    loader.overlay_generator.set_state(state["overlay"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return _RunState(state["epoch"], state["step"], state["best_acc"], state["best_epoch"],
                     state["best_state"], [EpochStats(**h) for h in state["history"]],
                     state["wall_s"], state["teacher_read"])


def teacher_forward(teacher: Net, x_clean: torch.Tensor, distill: Distillation,
                    precision: str, device: torch.device) -> TeacherOut:
    """The teacher's outputs for one clean augmented batch (eval mode, inference mode, the
    run's autocast): fp32 logits (Net.head) and, for AT, the fp32 attention map of its tap.

    The teacher sees the clean augmented image, not the IG-overlaid one: its soft labels and
    attention describe the real image the overlay was made from. The outputs are cloned out
    of inference mode (autograd may save them for the student's backward pass)."""
    with torch.inference_mode(), autocast(precision, device):
        if distill.use_at:
            logits, fmap = teacher.forward_tap(x_clean, distill.tap_of_teacher)
            att: torch.Tensor | None = attention_map(fmap.float())
        else:
            logits, att = teacher(x_clean), None
        logits = logits.float()
    return TeacherOut(logits.clone(), None if att is None else att.clone())


def _step_loss(model: Net, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
               distill: Distillation | None, t_out: TeacherOut | None,
               precision: str = "fp32", device: torch.device | None = None,
               epoch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, student logits) for one batch in the configured mode, given the teacher's
    outputs on its clean image (``t_out``; None without a teacher).

    The forward pass runs under the run's autocast; the losses in fp32 outside it, on fp32
    logits (Net.head) and fp32 feature maps: KD and AT compare two nearly equal
    distributions, where bf16 rounding is of the size of the signal.
    """
    t_att = t_out.attention if t_out is not None else None
    s_map = None
    with autocast(precision, device or x.device):
        if distill is not None and t_att is not None:
            logits, s_map = model.forward_tap(x, distill.tap)
        else:
            logits = model(x)
    logits = logits.float()
    if distill is not None and distill.kd is not None and t_out is not None:
        loss = distill_loss(logits, t_out.logits, y, distill.kd, cfg.label_smoothing, epoch)
    else:
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if distill is not None and t_att is not None and s_map is not None:
        if s_map.shape[-2] * s_map.shape[-1] != t_att.shape[-1]:
            raise KdigError(f"attention transfer: the student's map at {distill.tap!r} is "
                            f"{s_map.shape[-2]}x{s_map.shape[-1]}, the teacher's at "
                            f"{distill.tap_of_teacher!r} has {t_att.shape[-1]} positions; "
                            f"choose at_layer values whose maps have one size")
        loss = loss + distill.at_weight * at_loss_to(s_map.float(), t_att)
    return loss, logits


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """``path`` (.safetensors) and its config/metrics beside it (.json), each atomic."""
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()},
                                             str(tmp)))
    write_json(path.with_suffix(".json"), meta)


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity: such weights
    evaluate to a constant class (10% on ten classes) and NaN maps, never to an error."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]


def load_checkpoint(path: Path, model: Net) -> None:
    """Load weights strictly from a safetensors file (no pickle, so no code runs); refuse
    non-finite ones."""
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors' own error type: a truncated or damaged file
        raise KdigError(f"checkpoint {path} is not a readable safetensors file "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise KdigError(f"checkpoint {path} does not fit this model: {e}") from None
    bad = non_finite(state)
    if bad:
        raise KdigError(f"checkpoint {path}: NaN or infinite values in {len(bad)} tensor(s) "
                        f"({bad[0]}, ...); delete it to train it again")
