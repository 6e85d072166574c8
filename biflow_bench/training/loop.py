"""The training loop both stages run through (training/stages.py says what each stage trains and on what loss).

`fit`: AdamW (0.9, 0.95) with linear warm-up and cosine decay, gradient clipping, optional
EMA, atomic checkpoints that resume bit-exactly (each step draws its randomness from a generator seeded by
(seed, step), and the data stream can start at any step), non-finite steps skipped and counted, and Ctrl-C / SIGTERM
turned into a checkpoint at the next step boundary.

Under torchrun (`env` from distributed.init_from_env) the same loop runs DDP: the global batch is cut into
micro-batches, rank r takes micro-batches r, r + W, ... with gradient accumulation, each micro-batch draws its
randomness from (seed, step, micro-batch), so a run depends on the global batch and the micro-batch size but not on
the number of processes (distributed.py). Only rank 0 writes checkpoints; on CUDA the forward runs in bfloat16
autocast (as TARFlow trained its generation models; its likelihood models used float32).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..config import ConfigError, TrainingConfig
from ..data import ImageDataset, LatentDataset, batch_indices, data_generator, get_batch
from ..distributed import DistEnv, all_true, any_true, mean_over_ranks
from ..files import CorruptArtifact, atomic_torch_save, remove_artifact, verified_torch_load
from .. import threads
from ..models import layers

LossFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator], tuple[Tensor, dict[str, float]]]


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: a checkpoint was saved and the run can be resumed."""


@dataclass
class FitResult:
    model: nn.Module  # the EMA model when EMA is on
    steps: int
    seconds: float
    terms: dict[str, float] = field(default_factory=dict)  # loss terms averaged over the last steps
    skipped_steps: int = 0
    resumed_from: int = 0
    micro_batch: int = 0  # rows per forward pass; batch_size / (micro_batch * world_size) accumulation steps


def lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str = "cosine") -> float:
    """Linear warm-up, then cosine decay to 0 at `steps`, or "constant" at the peak (the authors' code base)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_update(ema: list[Tensor], params: list[Tensor], decay: float, step: int) -> None:
    """EMA of the weights after optimiser step `step` (0-based), in place: e <- d e + (1 - d) p with the decay
    warmed up as d = min(decay, (1 + step) / (10 + step)), so early averages are not dominated by the init."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema, params, 1 - d)


def step_generator(seed: int, step: int, chunk: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """The loss's randomness for micro-batch `chunk` of step `step` (chunk 0 on CPU: the single-process stream)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step + chunk * 1_000_000_007)


PROGRESS_EVERY_S = 60.0


class ProgressLines:
    """Progress for a log file: a line when a stage starts, one every PROGRESS_EVERY_S seconds with the rate and an
    estimate of the time left, and one when it ends (a terminal gets tqdm's bar instead)."""

    def __init__(self, desc: str, start: int, steps: int) -> None:
        self.desc, self.start, self.steps = desc, start, steps
        self.t0 = self.last = time.perf_counter()
        print(f"{desc}: step {start}/{steps}" + (" (resumed)" if start else ""), file=sys.stderr, flush=True)

    def update(self, step: int, shown: dict[str, str]) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        left = (self.steps - step) / max(rate, 1e-9)
        terms = " ".join(f"{k}={v}" for k, v in shown.items())
        print(f"{self.desc}: step {step}/{self.steps} ({100 * step / self.steps:.0f}%), {rate:.2f} steps/s, about "
              f"{left / 60:.1f} min left {terms}".rstrip(), file=sys.stderr, flush=True)

    def done(self, steps: int) -> None:
        print(f"{self.desc}: done, {steps} steps in {time.perf_counter() - self.t0:.0f} s", file=sys.stderr, flush=True)


class _StopFlag:
    """Turns SIGINT / SIGTERM into a flag checked at step boundaries (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _load_checkpoint(path: Path, owner: bool = True) -> dict | None:
    """The checkpoint at `path`, or None; a corrupt one is reported (and removed by its owner, rank 0)."""
    if not path.exists():
        return None
    try:
        return verified_torch_load(path)
    except CorruptArtifact as e:
        if owner:
            print(f"warning: {e}; starting this stage again", file=sys.stderr)
            remove_artifact(path)
        return None


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95), fused, with weight decay on matrices only (no decay on biases, norms, embeddings' rows
    of size 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


def autocast_context(device: torch.device, precision: str = "fp32", cuda_bf16: bool = True) -> torch.autocast:
    """The forward's autocast: bfloat16 when `precision` is "bf16" (CPU or CUDA), and on CUDA also when `cuda_bf16`
    (the distributed runs' default); otherwise a disabled autocast, i.e. float32."""
    enabled = precision == "bf16" or (cuda_bf16 and device.type == "cuda")
    return torch.autocast(device.type, torch.bfloat16, enabled=enabled)


def compile_in_place(model: nn.Module, cpp_wrapper: bool = False) -> None:
    """torch.compile the model's forward in place: its state_dict keys and methods stay those of the model, and
    methods that call self(...) (F's log_prob) run the compiled forward. `cpp_wrapper` for sampling at small
    batches (layers.compile_options)."""
    model.compile(backend=layers.COMPILE_BACKEND, dynamic=False,
                  options=layers.compile_options(layers.COMPILE_BACKEND, cpp_wrapper))


class _Loss(nn.Module):
    """The loss as one module, so DDP wraps every use of the model inside it (F's log_prob, G's two CFG passes)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return self.loss_fn(self.model, x, y, gen)


def with_ema(model: nn.Module, state: dict[str, Tensor], ema: list[Tensor]) -> dict[str, Tensor]:
    """`state` (a state_dict of `model`) with its parameters replaced by the EMA's, which fit keeps as a list in the
    order of model.parameters() (as in its checkpoints)."""
    return {**state, **{name: e for (name, _), e in zip(model.named_parameters(), ema, strict=True)}}


def kept_checkpoint(checkpoint: Path, step: int) -> Path:
    """Where fit keeps the checkpoint of `step` (keep_at) beside the running one."""
    return checkpoint.with_name(f"{checkpoint.stem}-{step:07d}{checkpoint.suffix}")


def doubling(first: int) -> Callable[[int], bool]:
    """`first`, 2 x `first`, 4 x `first`, ...: a schedule of kept checkpoints that does not depend on the run's
    length, so that runs of other lengths are scored at the same steps."""
    return lambda step: step >= first and step % first == 0 and (step // first) & (step // first - 1) == 0


@dataclass(frozen=True)
class Snapshot:
    """Hand the weights (the EMA's when there is one) to `call(step, state_dict)` every `every` steps and at the
    end: quality-against-training-time curves (curve.py)."""

    every: int
    call: Callable[[int, dict[str, Tensor]], None]


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: ImageDataset | LatentDataset,
    train: TrainingConfig,
    *,
    seed: int,
    checkpoint: Path | None = None,
    ema_decay: float | None = None,
    desc: str = "train",
    progress: bool = True,
    postfix: Callable[[dict[str, float]], dict[str, str]] | None = None,
    micro_batch: int | None = None,
    env: DistEnv | None = None,
    snapshot: Snapshot | None = None,
    keep_at: Callable[[int], bool] | None = None,
) -> FitResult:
    """Train `model` on `loss_fn` by the stage's `train` settings (steps, global batch, optimiser, schedule,
    checkpoints, precision: bfloat16 autocast when "bf16", on CUDA always; `compile`). `micro_batch` (default
    batch_size / world size) is the rows per forward pass. The checkpoint of each step `keep_at` accepts is kept
    beside `checkpoint` as checkpoint-<step>.pt (curve.checkpoint_curve scores them)."""
    steps, batch_size, lr = train.steps, train.batch_size, train.lr
    env = env or DistEnv()
    micro = micro_batch or batch_size // env.world_size
    chunks = batch_size // max(1, micro)
    if micro < 1 or batch_size % micro or chunks % env.world_size:
        raise ConfigError(f"a global batch of {batch_size} does not split into micro-batches of {micro} shared "
                          f"evenly by {env.world_size} processes")
    if chunks > 1 and len(dataset) < batch_size:
        raise ConfigError(f"{desc}: {len(dataset)} examples are fewer than one global batch of {batch_size}")
    accum, device = chunks // env.world_size, env.device
    model.to(device)
    opt = build_optimizer(model, lr, train.weight_decay)
    ema = [p.detach().clone() for p in model.parameters()] if ema_decay else None
    start, skipped, bad_in_row, elapsed = 0, 0, 0, 0.0
    recent: dict[str, list[float]] = {}  # the last 50 steps' loss terms: the progress bar and the record
    state = _load_checkpoint(checkpoint, env.is_main) if checkpoint else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema = [e.to(device) for e in state["ema"]]
        start, skipped, bad_in_row, elapsed = state["step"], state["skipped"], state["bad_in_row"], state["elapsed"]
        recent = state.get("recent", {})

    def save(step: int, path: Path | None = checkpoint) -> None:
        if path is not None and env.is_main:
            atomic_torch_save(
                {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema,
                 "skipped": skipped, "bad_in_row": bad_in_row, "elapsed": elapsed + time.perf_counter() - t0,
                 "recent": recent},
                path,
            )

    model.train()
    if train.compile:
        compile_in_place(model)
    loss_module: nn.Module = _Loss(model, loss_fn)
    if env.distributed:
        loss_module = DistributedDataParallel(loss_module, device_ids=[device] if device.type == "cuda" else None)
    autocast = autocast_context(device, train.precision)
    indices = batch_indices(len(dataset), batch_size, seed, start)
    t0 = time.perf_counter()
    terminal = sys.stderr.isatty()  # a bar on a terminal; without one (logs, nohup), a line every PROGRESS_EVERY_S
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not (progress and env.is_main and terminal),
               mininterval=1.0, leave=False)
    lines = ProgressLines(desc, start, steps) if progress and env.is_main and not terminal else None
    with _StopFlag() as stop:
        for step in range(start, steps):
            threads.rebalance()
            if any_true(stop.signum is not None, env):
                save(step)
                where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint path"
                raise TrainingInterrupted(f"{desc} interrupted at step {step}/{steps}; {where}; re-run the same command to resume")
            idx = next(indices)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, train.warmup, train.schedule)
            opt.zero_grad(set_to_none=True)
            finite, step_terms = True, {}
            for k in range(accum):  # this rank's micro-batches of the global batch
                chunk = env.rank + k * env.world_size
                rows = idx[chunk * micro : (chunk + 1) * micro]
                x, y = (t.to(device) for t in get_batch(dataset, rows, data_generator(seed, step, chunk)))
                last = k == accum - 1
                with contextlib.nullcontext() if last or not env.distributed else loss_module.no_sync():
                    with autocast:
                        loss, terms = loss_module(x, y, step_generator(seed, step, chunk, device))
                    finite = finite and bool(torch.isfinite(loss))
                    if finite or env.distributed:  # every rank must join DDP's all-reduce
                        (loss / accum).backward()
                for key, v in terms.items():
                    step_terms[key] = step_terms.get(key, 0.0) + v / accum
            finite = all_true(finite, env)
            if finite:
                finite = bool(torch.isfinite(nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)))
            if not finite:  # skip the update, count it, stop after too many in a row
                opt.zero_grad(set_to_none=True)
                skipped, bad_in_row = skipped + 1, bad_in_row + 1
                if bad_in_row >= train.max_bad_steps:
                    last_ck = f"last good checkpoint: {checkpoint}" if checkpoint and checkpoint.exists() else "no checkpoint yet"
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in step_terms.items())
                    raise TrainingDiverged(f"{desc}: {bad_in_row} non-finite losses in a row at step {step} ({shown}); {last_ck}")
            else:
                bad_in_row = 0
                opt.step()
                if ema is not None:
                    ema_update(ema, [p.detach() for p in model.parameters()], ema_decay, step)
                for k, v in step_terms.items():
                    recent.setdefault(k, []).append(v)
                    del recent[k][:-50]
            if snapshot is not None and ((step + 1) % snapshot.every == 0 or step + 1 == steps):
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if ema is not None:  # the weights a run ends with: the EMA's
                    weights = with_ema(model, weights, [e.clone() for e in ema])
                snapshot.call(step + 1, weights)
            if (step + 1) % train.checkpoint_every == 0 and step + 1 < steps:
                save(step + 1)
            if checkpoint is not None and keep_at is not None and keep_at(step + 1) and step + 1 < steps:
                save(step + 1, kept_checkpoint(checkpoint, step + 1))
            bar.update(1)
            if progress and env.is_main and (step % 10 == 0 or lines is not None):
                avg = {k: sum(v) / len(v) for k, v in recent.items()}
                shown = postfix(avg) if postfix else {k: f"{v:.4f}" for k, v in avg.items()}
                bar.set_postfix(shown)
                if lines is not None:
                    lines.update(step + 1, shown)
    bar.close()
    if lines is not None:
        lines.done(steps)
    seconds = elapsed + time.perf_counter() - t0
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(model.parameters(), ema, strict=True):
                p.copy_(e)
    if train.compile:  # hand back a plain module: sampling shapes would only recompile it
        model._compiled_call_impl = None  # what nn.Module.compile set
    model.eval()
    avg = mean_over_ranks({k: sum(v) / len(v) for k, v in recent.items()}, env)
    return FitResult(model, steps, seconds, avg, skipped, start, micro)
