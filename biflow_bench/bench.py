"""Speed benchmark: every sampler of the speed table (ablations/speed.toml) timed at several batch sizes.

For each variant the models are built from the variant's resolved config (random weights: a sampler's cost does
not depend on the values of its weights) and the variant's `Sampler` is timed end to end:

    nfe              sequential network evaluations per image (`Sampler.nfe`)
    flops_per_image  torch.utils.flop_counter over one call at a small batch (matmuls and attention only)
    ms_per_image     median over `repeats` timed calls after `warmup` untimed ones, divided by the batch size
                     (ms_min: the fastest call, a hint of how noisy the machine was)
    speedup          exact's ms / this ms at the same batch size
    peak_fraction    achieved FLOP/s over the matmul peak measured in the same run (a large square matmul)

`what="train"` times one optimisation step instead (forward + backward + AdamW): stage 1 (F by maximum likelihood)
as sampler "train-flow" and stage 2 (G against the frozen F) as "train-backward"; `what="all"` does both.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from .ablations import get_spec
from .config import RunConfig
from .losses import nll_loss, stage2_loss
from .models.biflow import BiFlow
from .models.tarflow import TARFlow
from .sample import Sampler, image_noise
from . import train
from .train import autocast_context, build_optimizer, compile_in_place

WHATS = ("sample", "train", "all")
TRAIN_VARIANT = "learned"  # the speed-table variant whose config the training-step rows use
FLOP_BATCH = 2  # batch of the FLOP-counting call (FLOPs per image do not depend on it)


# ----------------------------------------------------------------------------------------------------------------------
# measurement helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed ones (synchronised on cuda)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                min_tries: int = 5, max_tries: int = 30, budget_s: float = 0.5) -> float:
    """FLOP/s of a large square matmul, 2 n^3 / t for the best of at least `min_tries` timed products (more, up
    to `max_tries`, while `budget_s` lasts: the best of many is a steadier peak on a shared machine)."""
    n = n or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    reps = 1 if device.type == "cpu" else 10  # on cuda, amortise the launch and the synchronisation
    best = math.inf
    with torch.inference_mode():
        a @ b
        _sync(device)
        start = time.perf_counter()
        for i in range(max_tries):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            _sync(device)
            best = min(best, (time.perf_counter() - t0) / reps)
            if i + 1 >= min_tries and time.perf_counter() - start > budget_s:
                break
    return 2 * n**3 / best


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _flop_mapping() -> dict:
    """flop_counter knows the CUDA attention kernels but not SDPA's CPU one; count it like the others."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return mapping


class _FlopCounter(TorchDispatchMode):
    """Sums flop_counter's per-op formulas over every aten op that runs. Unlike FlopCounterMode it tracks no
    modules, whose hooks break `torch.autograd.grad` (the score step)."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = {**flop_registry, **{k: shape_wrapper(v) for k, v in _flop_mapping().items()}}
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` by torch.utils.flop_counter's formulas (matmuls, convolutions, attention; the
    backward of whatever runs under autograd included)."""
    with _FlopCounter() as counter:
        fn()
    return counter.total


def count_params(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _unzero(model: nn.Module, seed: int) -> nn.Module:
    """Fill the zero-initialised parameters (output layers, adaLN modulation) with small random values, so no
    timed arithmetic runs on all-zero weights. Timing does not depend on the values otherwise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def _git_commit() -> str:
    """HEAD's commit read from the .git directory (no subprocess)."""
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def environment(device: torch.device) -> dict[str, str]:
    env = {"git_commit": _git_commit(), "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "device": device.type, "threads": str(torch.get_num_threads()),
           "cpu": _cpu_name()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
    return env


# ----------------------------------------------------------------------------------------------------------------------
# what is timed


def build_variant_models(cfg: RunConfig, device: torch.device, seed: int = 0) -> tuple[TARFlow, BiFlow | None]:
    """F and (for the learned inverse) G of a resolved config, randomly initialised, in eval mode on `device`."""
    torch.manual_seed(seed)
    flow = _unzero(TARFlow(cfg.flow), seed).to(device).eval()
    g = _unzero(BiFlow(cfg.backward), seed + 1).to(device).eval() if cfg.inverse == "learned" else None
    return flow, g


def _inputs(cfg: RunConfig, batch: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    shape = (cfg.flow.in_channels, cfg.flow.image_size, cfg.flow.image_size)
    z = image_noise(range(batch), shape).to(device)
    y = torch.arange(batch, device=device) % cfg.flow.num_classes if cfg.flow.num_classes else None
    return z, y


def _sampler_call(sampler: Sampler, flow: TARFlow, g: BiFlow | None, z: Tensor, y: Tensor | None,
                  amp: bool, inference: bool = True, stats: dict[str, Any] | None = None) -> Callable[[], Tensor]:
    """One sampler call under inference_mode (no_grad when the score step needs autograd, or when not
    `inference`: FLOP counting needs composite ops such as linear decomposed into matmuls, which inference_mode
    skips), with bf16 autocast for G when `amp`. Jacobi decoding writes its passes into `stats`."""
    grad_ctx: Callable[[], AbstractContextManager] = (
        torch.inference_mode if inference and sampler.denoise != "score" else torch.no_grad)

    def call() -> Tensor:
        with grad_ctx():
            if amp and sampler.inverse == "learned":
                with torch.autocast(z.device.type, dtype=torch.bfloat16):
                    x = g.sample(z, y, cfg_scale=sampler.cfg_scale)  # type: ignore[union-attr]
                x = x.float()
                if sampler.denoise == "score":
                    x = flow.denoise(x, y, sampler.sigma)
                return x
            return sampler(flow, g, z, y, stats)

    return call


def parse_train_setting(setting: str) -> tuple[str, bool]:
    """"fp32", "bf16", "fp32+compile", "bf16+compile" -> (precision, compile): TrainingConfig's switches."""
    precision, _, rest = setting.partition("+")
    if precision not in ("fp32", "bf16") or rest not in ("", "compile"):
        raise ValueError(f"training setting {setting!r} is not one of fp32, bf16, fp32+compile, bf16+compile")
    return precision, rest == "compile"


def _train_step(model: nn.Module, loss_fn: Callable[[], Tensor], device: torch.device, precision: str = "fp32",
                compile: bool = False, lr: float = 1e-4, weight_decay: float = 1e-4) -> Callable[[], None]:
    """One optimisation step as train.fit does it, with its optimizer (parameter groups: no decay on biases),
    autocast and compilation: forward, backward, gradient clipping, AdamW (0.9, 0.95)."""
    opt = build_optimizer(model, lr, weight_decay)
    if compile:
        compile_in_place(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with autocast_context(device, precision, cuda_bf16=False):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def _training_calls(cfg: RunConfig, device: torch.device, batch: int, seed: int, setting: str = "fp32",
                    ) -> dict[str, tuple[Callable[[], None], nn.Module, nn.Module | None]]:
    """{sampler name: (step, trained model, frozen model)} for stage 1 and stage 2 at one batch size, with the
    training `setting` (see parse_train_setting)."""
    precision, compile = parse_train_setting(setting)
    flow, g = build_variant_models(cfg, device, seed)
    assert g is not None
    shape = (cfg.flow.in_channels, cfg.flow.image_size, cfg.flow.image_size)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, *shape, generator=gen) * 2 - 1).to(device)
    y = torch.randint(0, max(cfg.flow.num_classes, 1), (batch,), generator=gen).to(device) \
        if cfg.flow.num_classes else None
    flow.train()
    s1 = cfg.stage1
    frozen = TARFlow(cfg.flow).to(device).eval().requires_grad_(False)  # stage 2 trains G against a frozen F
    frozen.load_state_dict(flow.state_dict())
    flow_step = _train_step(flow, lambda: nll_loss(flow, x + s1.noise_sigma * torch.randn_like(x), y), device,
                            precision, compile, weight_decay=s1.weight_decay)

    g.train()
    s2 = cfg.stage2
    step_gen = torch.Generator(device=device).manual_seed(seed)

    def g_loss() -> Tensor:
        loss, _ = stage2_loss(g, frozen, x, y if cfg.backward.num_classes else None, s2, sigma=s1.noise_sigma,
                              perceptual={}, generator=step_gen)
        return loss

    g_step = _train_step(g, g_loss, device, precision, compile, weight_decay=s2.weight_decay)
    return {"train-flow": (flow_step, flow, None), "train-backward": (g_step, g, frozen)}


# ----------------------------------------------------------------------------------------------------------------------
# the benchmark


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_speed_bench(
    scale: str = "tiny",
    batch_sizes: Sequence[int] = (1, 64, 256),
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 2,
    what: str = "sample",
    progress: bool = False,
    amp: bool | None = None,
    seed: int = 0,
    train_settings: Sequence[str] = ("fp32",),
    compile: bool = False,
) -> dict[str, Any]:
    """Time every sampler of the speed table (and/or a training step of each stage) at each batch size; returns a
    speed record (see the module docstring). `amp` (default: on for cuda) runs G under bf16 autocast; F's exact
    inverse and score step always run in float32."""
    if what not in WHATS:
        raise ValueError(f"what={what!r} is not one of {', '.join(WHATS)}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    batch_sizes = [int(b) for b in batch_sizes]
    train_settings = list(dict.fromkeys(train_settings))
    if not train_settings:
        raise ValueError("train_settings needs at least one setting, e.g. fp32")
    for setting in train_settings:
        parse_train_setting(setting)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    amp = dev.type == "cuda" if amp is None else amp
    start = time.perf_counter()
    spec = get_spec("speed")

    _log(progress, f"matmul peak on {dev} ...")
    peak = matmul_peak(dev)
    peak_bf16 = matmul_peak(dev, torch.bfloat16)
    machine = {"device": _device_name(dev), "matmul_peak_flops": peak, "matmul_peak_flops_bf16": peak_bf16,
               "threads": torch.get_num_threads(), "torch": torch.__version__}

    rows: list[dict[str, Any]] = []
    if what in ("sample", "all"):
        rows += _sampling_rows(spec, scale, batch_sizes, dev, repeats, warmup, amp, seed, peak, peak_bf16, progress,
                               compile)
        if spec.resolve("exact", scale).dataset == "latents":
            rows += _decoder_rows(spec.resolve("exact", scale), batch_sizes, dev, repeats, warmup, amp, peak,
                                  peak_bf16, progress)
    if what in ("train", "all"):
        rows += _training_rows(spec, scale, batch_sizes, dev, repeats, warmup, seed, peak, peak_bf16,
                               train_settings, progress)

    notes = [
        "Models are randomly initialised from each variant's resolved config: a sampler's cost does not depend on "
        "the values of its weights, so no training is needed (zero-initialised layers get small random values).",
        "ms_per_image: median wall time of one call over `repeats` calls (after `warmup`), divided by the batch "
        "size; at each batch size the samplers' calls are interleaved round by round, each timed call right after an "
        "untimed one of the same sampler (steady state, as when sampling many batches). Noise generation is "
        "excluded, the score step and CFG are included.",
        "speedup: the exact serial inverse's ms per image over this sampler's at the same batch size.",
        "flops_per_image: torch.utils.flop_counter over one call at batch "
        f"{FLOP_BATCH} (matmuls and attention only; elementwise ops are not counted); the score step counts "
        "F's forward and backward pass. peak_fraction: flops_per_image x images_per_s over the matmul peak "
        "(best of several large square matmuls in this run).",
        "The exact inverse decodes num_blocks x (tokens - 1) tokens one at a time with a preallocated KV cache; "
        "inference CFG batches the conditional and guiding passes into one batch of 2B.",
        "exact-jacobi solves the same inverse by Jacobi passes over groups of tokens until no value moves more "
        "than the tolerance (at most one pass per token: then it equals the serial result); its NFE is the passes "
        "of the timed batch, summed over the flow blocks, and its FLOPs are those of the FLOP-counting call.",
    ]
    if dev.type == "cpu":
        notes.append(f"CPU run with {torch.get_num_threads()} threads; peak_memory_mb is not measured on CPU "
                     "(None). Timings on a shared machine vary from run to run.")
    if amp:
        notes.append("G runs under bf16 autocast (its peak_fraction is against the bf16 matmul peak); F's exact "
                     "inverse and the score step run in float32.")
    if compile:
        notes.append("name:compiled rows: the same sampler with G's pass under torch.compile (backend "
                     f"{train.COMPILE_BACKEND}, static shapes: compiled once per batch size in the warm-up, untimed); "
                     "the exact inverse runs its hand-fused eager decoder (weights hoisted, KV cache in place), "
                     "not compiled.")
    if what in ("train", "all"):
        notes.append(f"train-flow / train-backward: one optimisation step (forward, backward, gradient clipping, "
                     f"AdamW) of stage 1 (F, maximum likelihood) and stage 2 (G against the frozen F, MSE + hidden "
                     f"alignment, no perceptual terms) with the '{TRAIN_VARIANT}' variant's config and train.py's "
                     "optimizer (no weight decay on biases). Settings (TrainingConfig.precision / .compile): "
                     f"{', '.join(train_settings)}, timed in interleaved rounds; a row named stage:setting is a "
                     f"setting other than the first ({train_settings[0]}), and speedup is over the first setting's "
                     "row of the same stage. peak_fraction is against the matmul peak of the setting's precision "
                     "(peak_fraction_fp32: against the float32 peak).")

    return {
        "schema": 1, "kind": "speed", "ablation": spec.name, "variant": "bench", "label": spec.title,
        "scale": scale, "seed": seed, "spec_version": spec.version,
        "config": {"batch_sizes": batch_sizes, "device": device, "repeats": repeats, "warmup": warmup,
                   "what": what, "amp": amp, **({"train_settings": train_settings} if what != "sample" else {}),
                   **({"compile": True} if compile else {})},
        "rows": rows, "machine": machine, "metrics": {}, "timing": {},
        "paper": {"table": spec.paper_table}, "notes": notes, "env": environment(dev),
        "wall_time_s": time.perf_counter() - start,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _sampling_rows(spec, scale: str, batch_sizes: list[int], dev: torch.device, repeats: int, warmup: int,
                   amp: bool, seed: int, peak: float, peak_bf16: float | None, progress: bool,
                   compile: bool = False) -> list[dict]:
    """One row per (variant, batch size). At each batch size the variants' timed calls are interleaved (one call of
    each variant per round), so a burst of load on a shared machine hits every sampler alike; each timed call follows
    an untimed call of the same sampler, so none pays for the cold caches another sampler left behind (at batch 1 a
    pass of G right after the exact inverse is ~30% slower than the next one)."""
    setups = {}
    for name, variant in spec.variants.items():
        cfg = spec.resolve(name, scale)
        sampler = Sampler.from_config(cfg)
        flow, g = build_variant_models(cfg, dev, seed)
        uses_flow = sampler.inverse == "exact" or sampler.denoise == "score"
        z, y = _inputs(cfg, FLOP_BATCH, dev)
        flops = count_flops(_sampler_call(sampler, flow, g, z, y, amp, inference=False)) / FLOP_BATCH
        row_peak = peak_bf16 if (amp and sampler.inverse == "learned" and peak_bf16) else peak
        setups[name] = (variant, cfg, sampler, flow, g, count_params(flow if uses_flow else None, g), flops, row_peak)
        if compile and sampler.inverse == "learned" and sampler.denoise != "score":
            # G's sampling pass under torch.compile (a compiled copy; per-operator overhead dominates at batch 1)
            compiled = copy.deepcopy(g)
            compile_in_place(compiled)  # type: ignore[arg-type]
            label = f"{variant.label or name}, torch.compile"
            setups[f"{name}:compiled"] = (dataclasses.replace(variant, name=f"{name}:compiled", label=label, paper={}),
                                          cfg, sampler, flow, compiled, *setups[name][5:])

    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for bs in batch_sizes:
        calls, stats = {}, {}
        for name, (_, cfg, sampler, flow, g, *_) in setups.items():
            z, y = _inputs(cfg, bs, dev)
            stats[name] = {}
            calls[name] = _sampler_call(sampler, flow, g, z, y, amp, stats=stats[name])
        times: dict[str, list[float]] = {name: [] for name in calls}
        peak_mb: dict[str, float | None] = {}
        for name, call in calls.items():  # warm-up, which also gives the peak memory of a call (cuda)
            _reset_peak_memory(dev)
            time_calls(call, dev, 0, max(warmup, 1 if dev.type == "cuda" else 0))
            peak_mb[name] = _peak_memory_mb(dev)
        for _ in range(repeats):
            for name, call in calls.items():
                times[name] += time_calls(call, dev, 1, 1)
        for name in calls:
            sec = statistics.median(times[name])
            _, _, sampler, flow, g, *_ = setups[name]
            nfe, nfe_label = sampler.nfe(flow, g, stats[name].get("jacobi_iterations"))  # Jacobi: this batch's passes
            cells[name, bs] = {"ms": sec / bs * 1e3, "ips": bs / sec, "ms_min": min(times[name]) / bs * 1e3,
                               "peak_mb": peak_mb[name], "nfe": nfe, "nfe_label": nfe_label}
            _log(progress, f"{name:12s} batch {bs:4d}: {sec / bs * 1e3:9.3f} ms/image (nfe {nfe_label})")

    rows: list[dict[str, Any]] = []
    for name, (variant, _, _, _, _, params, flops, row_peak) in setups.items():
        for bs in batch_sizes:
            c = cells[name, bs]
            exact = cells.get(("exact", bs))
            rows.append({
                "sampler": name, "label": variant.label or name, "nfe": c["nfe"], "nfe_label": c["nfe_label"],
                "params": params, "flops_per_image": float(flops), "batch_size": bs, "ms_per_image": c["ms"],
                "images_per_s": c["ips"], "speedup": exact["ms"] / c["ms"] if exact else None,
                "peak_fraction": flops * c["ips"] / row_peak, "peak_memory_mb": c["peak_mb"],
                "paper_ms": _num(variant.paper.get("ms_per_image")),
                "paper_speedup": _num(variant.paper.get("speedup")),
                "ms_min": c["ms_min"],
            })
    return rows


def _decoder_rows(cfg: RunConfig, batch_sizes: list[int], dev: torch.device, repeats: int, warmup: int, amp: bool,
                  peak: float, peak_bf16: float | None, progress: bool) -> list[dict]:
    """The VAE decoder at latent scales, timed alone as the paper reports it (BiFlow Table 1 excludes it): the
    local sd-vae-ft-ema when there is one, else a random AutoencoderKL of its architecture (same cost)."""
    from .latents import SD_VAE_ARCH, TINY_VAE_ARCH, load_vae, random_vae
    from .weights import WeightsError

    try:
        vae, weights = load_vae(device=dev), "local weights"
    except WeightsError:
        arch = SD_VAE_ARCH if cfg.flow.image_size == 32 else TINY_VAE_ARCH
        vae, weights = random_vae(arch).to(dev), "random weights"
    decoder = vae.eval()
    shape = (cfg.flow.in_channels, cfg.flow.image_size, cfg.flow.image_size)

    def call_for(batch: int, inference: bool = True) -> Callable[[], Tensor]:
        z = image_noise(range(batch), shape).to(dev)

        def call() -> Tensor:
            with torch.inference_mode() if inference else torch.no_grad():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    return decoder.decode(z).sample

        return call

    flops = count_flops(call_for(FLOP_BATCH, inference=False)) / FLOP_BATCH
    params = count_params(decoder.decoder, decoder.post_quant_conv)
    rows = []
    for bs in batch_sizes:
        call = call_for(bs)
        _reset_peak_memory(dev)
        times = time_calls(call, dev, repeats, max(warmup, 1))
        sec = statistics.median(times)
        rows.append({
            "sampler": "vae-decoder", "label": f"VAE decoder (sd-vae-ft-ema architecture, {weights})", "nfe": 1,
            "nfe_label": "1 (decoder)", "params": params, "flops_per_image": flops, "batch_size": bs,
            "ms_per_image": sec / bs * 1e3, "images_per_s": bs / sec, "speedup": None,
            "peak_fraction": flops * bs / sec / ((peak_bf16 if amp and peak_bf16 else peak)),
            "peak_memory_mb": _peak_memory_mb(dev), "paper_ms": None, "paper_speedup": None,
            "ms_min": min(times) / bs * 1e3,
        })
        _log(progress, f"vae-decoder  batch {bs:4d}: {sec / bs * 1e3:9.3f} ms/image")
    return rows


def _training_rows(spec, scale: str, batch_sizes: list[int], dev: torch.device, repeats: int, warmup: int,
                   seed: int, peak: float, peak_bf16: float, settings: Sequence[str], progress: bool) -> list[dict]:
    """One row per (setting, stage, batch size). At each batch size every setting's steps are built and warmed up
    (compilation happens there), then timed in interleaved rounds, one step of each per round, so that a burst of
    load on a shared machine hits every setting alike. The first setting is the baseline of the speed-up."""
    cfg = spec.resolve(TRAIN_VARIANT, scale)
    labels = {"train-flow": "Training step, stage 1 (F, maximum likelihood)",
              "train-backward": "Training step, stage 2 (G against frozen F)"}
    flops: dict[str, float] = {}
    for name, (step, _, _) in _training_calls(cfg, dev, FLOP_BATCH, seed).items():  # the same math in every setting
        flops[name] = count_flops(step) / FLOP_BATCH
    rows: list[dict[str, Any]] = []
    for bs in batch_sizes:
        steps = {(setting, name): call for setting in settings
                 for name, call in _training_calls(cfg, dev, bs, seed, setting).items()}
        for (setting, name), (step, _, _) in steps.items():
            _log(progress, f"warming up {name} ({setting}) at batch {bs} ...")
            time_calls(step, dev, 0, max(warmup, 2 if parse_train_setting(setting)[1] else 0))
        times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
        for _ in range(repeats):
            for key, (step, _, _) in steps.items():
                times[key] += time_calls(step, dev, 1, 0)
        for (setting, name), (_, model, _) in steps.items():
            sec = statistics.median(times[setting, name])
            base = statistics.median(times[settings[0], name])
            ips = bs / sec
            row_peak = peak_bf16 if parse_train_setting(setting)[0] == "bf16" else peak
            rows.append({
                "sampler": name if setting == settings[0] else f"{name}:{setting}",
                "label": f"{labels[name]}, {setting}", "setting": setting, "nfe": 1,
                "nfe_label": "fwd + bwd + AdamW", "params": count_params(model), "flops_per_image": flops[name],
                "batch_size": bs, "ms_per_image": sec / bs * 1e3, "images_per_s": ips, "speedup": base / sec,
                "peak_fraction": flops[name] * ips / row_peak, "peak_fraction_fp32": flops[name] * ips / peak,
                "peak_memory_mb": _peak_memory_mb(dev), "paper_ms": None, "paper_speedup": None,
                "ms_min": min(times[setting, name]) / bs * 1e3,
            })
            _log(progress, f"{name:14s} {setting:13s} batch {bs:4d}: {sec / bs * 1e3:9.3f} ms/image, "
                           f"{ips:9.1f} images/s, {100 * rows[-1]['peak_fraction']:.1f}% of the "
                           f"{'bf16' if row_peak is peak_bf16 else 'fp32'} peak")
    return rows


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ----------------------------------------------------------------------------------------------------------------------
# terminal table


def _fmt(v: Any, spec: str, dash: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return dash
    return format(v, spec)


def format_speed_table(record: dict[str, Any]) -> str:
    """A markdown table of a speed record's rows, with the machine and the notes underneath."""
    head = ["sampler", "NFE", "batch", "ms/image", "images/s", "speed-up", "% peak", "params (M)", "GFLOP/image",
            "paper ms", "paper speed-up"]
    body = []
    for r in record["rows"]:
        body.append([
            str(r["sampler"]), str(r.get("nfe_label") or r.get("nfe", "")), str(r["batch_size"]),
            _fmt(r.get("ms_per_image"), ".3f"), _fmt(r.get("images_per_s"), ".1f"),
            _fmt(r.get("speedup"), ".2f") if r.get("speedup") is None else f"x{r['speedup']:.2f}",
            _fmt(None if r.get("peak_fraction") is None else 100 * r["peak_fraction"], ".1f"),
            _fmt(None if r.get("params") is None else r["params"] / 1e6, ".3f"),
            _fmt(None if r.get("flops_per_image") is None else r["flops_per_image"] / 1e9, ".4f"),
            _fmt(r.get("paper_ms"), ".2f"),
            "-" if r.get("paper_speedup") is None else f"x{r['paper_speedup']:.0f}",
        ])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    right = {i for i in range(2, len(head))}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    m = record.get("machine", {})
    peak = m.get("matmul_peak_flops")
    title = (f"{record.get('label', 'Sampling speed')} - scale {record.get('scale')}, {m.get('device', '?')}, "
             f"matmul peak {_fmt(None if peak is None else peak / 1e9, '.1f')} GFLOP/s"
             + (f" (bf16 {m['matmul_peak_flops_bf16'] / 1e9:.1f} GFLOP/s)" if m.get("matmul_peak_flops_bf16") else ""))
    out = [title, "", line(head), sep, *(line(r) for r in body)]
    paper = record.get("paper", {}).get("table")
    if paper:
        out += ["", f"paper: {paper}"]
    return "\n".join(out) + "\n"
