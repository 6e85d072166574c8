"""A run's identity, in one place: what names a trained model, a result record and a table row.

    flow_key / backward_key   the artifact cache keys of F (stage 1) and G (stage 2): everything that determines each
                              trained model (peer_key: a 1-NFE peer's)
    config_id                 a record's hash: every setting the run reads (`read_settings`), and the micro-batch
                              where it changes the numbers; the seed is not part of it
    config_overrides          how a config differs from its variant's default, as dotted keys: the record's name
                              (readable when none, else hashed) and its label in the report
    RunIdentity               a run's record hash, overrides and micro-batch (`run_identity`)

(The report's split of records into each variant's default config and the rest is report/configs.py's.)

It sits above config.py (the configs it names) and below the runner, the cache and the report, which ask it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import PeerConfig, RunConfig, SampleConfig, config_hash

# Part of every artifact key: bump it when a code change alters what a config trains (v2: F's and G's class
# embeddings start at N(0, 0.01^2); stage 2's objective follows eq. 5 and 7), so no cache serves stale weights.
TRAINING_CODE_VERSION = 2
# Likewise for the perceptual terms alone, in the keys of Gs trained with them (v2: float32 on the CPU under bf16).
PERCEPTUAL_CODE_VERSION = 2


# ------------------------------------------------------------------------------------------------- artifact keys
# Trained models in the cache are stored under these keys: changing what they hash retrains every model.

def flow_key(cfg: RunConfig, micro_batch: int | None = None, device: str = "cpu") -> str:
    """Hash of everything that determines F (its seed is stage1.seed): runs that share it share the trained forward
    flow. A micro-batch that splits the batch (each micro-batch draws its own randomness) and a non-CPU device (bf16
    autocast) change the trained weights, so they are part of the key when present."""
    return config_hash({"dataset": cfg.dataset, "flow": _without_later_defaults(dataclasses.asdict(cfg.flow)),
                        "stage1": _stage_settings(cfg.stage1),
                        "code": TRAINING_CODE_VERSION, **_split_key(micro_batch, cfg.stage1.batch_size, device)})


def backward_key(cfg: RunConfig, seed: int, micro_batch: int | None = None, device: str = "cpu") -> str:
    """Hash of everything that determines G: the run's seed, its config and (through flow_key) its F."""
    perceptual = {"perceptual_code": PERCEPTUAL_CODE_VERSION} if cfg.stage2.metric != "mse" else {}
    return config_hash({"stage1": flow_key(cfg, micro_batch, device), "backward": cfg.trained_backward,
                        "stage2": without_unused_settings(_stage_settings(cfg.stage2)), "seed": seed, **perceptual,
                        **_split_key(micro_batch, cfg.stage2.batch_size, device)})


def peer_key(cfg: RunConfig, peer: PeerConfig, seed: int, micro_batch: int | None = None, device: str = "cpu") -> str:
    """Hash of everything that determines a 1-NFE peer: the data, G's backbone it is sized by, its training and the
    run's seed (a peer's seeds are the table's, as G's)."""
    return config_hash({"dataset": cfg.dataset, "backbone": cfg.trained_backward, "peer": _stage_settings(peer),
                        "seed": seed, "code": TRAINING_CODE_VERSION,
                        **_split_key(micro_batch, peer.batch_size, device)})


# The settings each perceptual term reads, and those every term reads (Stage2Config)
PERCEPTUAL_SETTINGS = {"lpips": ("lpips_net", "lpips_weight"), "convnext": ("convnext_net", "convnext_weight")}
SHARED_PERCEPTUAL_SETTINGS = ("perceptual_weights", "perceptual_size", "perceptual_crop_min", "perceptual_batch")


def without_unused_settings(stage2: Mapping[str, Any]) -> dict[str, Any]:
    """A stage-2 config (dict form) less the perceptual settings its metric never reads (an MSE G is the same run
    whatever the crop size of a term it does not have)."""
    terms = set(stage2.get("metric", "mse").split("+")) - {"mse"}
    unused = [k for term, keys in PERCEPTUAL_SETTINGS.items() if term not in terms for k in keys]
    if not terms:
        unused += SHARED_PERCEPTUAL_SETTINGS
    return {k: v for k, v in stage2.items() if k not in unused}


# Settings added after models and records were keyed, left out of every key and hash at this default value, so the
# keys of everything run before them stand
LATER_DEFAULTS = {"precision": "fp32", "schedule": "cosine", "noise": "gaussian", "coupling": "autoregressive"}


def _stage_settings(stage: Any) -> dict[str, Any]:
    """What of a stage's config determines the trained model: `compile` does not (same math); LATER_DEFAULTS at
    their default are left out."""
    d = dataclasses.asdict(stage)
    del d["compile"]
    return _without_later_defaults(d)


def _without_later_defaults(stage: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stage.items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}


def _split_key(micro_batch: int | None, batch_size: int, device: str) -> dict[str, Any]:
    """The parts of a stage key beyond the config, present only when they differ from one CPU pass per batch (so the
    keys of one-process CPU runs never change)."""
    key: dict[str, Any] = {}
    if micro_batch is not None and micro_batch != batch_size:
        key["micro_batch"] = micro_batch
    if device != "cpu":
        key["device"] = device
    return key


# --------------------------------------------------------------------------------------------------- record hash

EXACT_ONLY_SAMPLING = SampleConfig.read_by("exact", "jacobi")
PEER_SAMPLING = SampleConfig.read_by("peer")
JACOBI_SETTINGS = SampleConfig.read_by("jacobi")
TRAINING_TIME_CFG = ("cfg_max", "cfg_distribution", "cfg_uncond_grad")  # read only by cfg_mode "training-time"


def read_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config (RunConfig.to_dict() form, any subset of it) less every setting the run never reads, so configs that
    differ only there are one run. Read by runner.py, sample.py and training/losses.py:

    - the exact inverse has no G: no stage2.*, and of backward.* only the denoising mode;
    - G's sampler reads no exact-inverse setting (guidance temperature, annealing, decoder), and only the Jacobi
      decoder reads jacobi_*;
    - an unguided row (cfg_scale 0) is sampled at w = 0 alone, never at the sweep's scales;
    - a G trains the perceptual settings of its metric's terms only, the CFG-scale draw only with training-time CFG
      and drops labels only with some CFG;
    - only a peer (inverse "peer") reads peer.* and the peers' sampling steps and solver, and a peer trained at equal
      compute not its own peer.steps (F's and G's training set them)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
    exact, backward = out.get("inverse") == "exact", out.get("backward", {})
    peer = out.get("inverse") == "peer"
    if not peer:
        out.pop("peer", None)
    elif out.get("peer", {}).get("equal_compute"):  # its steps are set by F's and G's training (speed/budget.py)
        out["peer"] = {k: v for k, v in out["peer"].items() if k != "steps"}
    if exact:
        out.pop("stage2", None)
        if "backward" in out:
            out["backward"] = {k: v for k, v in backward.items() if k == "denoise"}
    else:
        mode = backward.get("cfg_mode", "training-time")
        unread = (TRAINING_TIME_CFG if mode != "training-time" else ()) + (("label_drop",) if mode == "none" else ())
        if "stage2" in out:
            out["stage2"] = {k: v for k, v in without_unused_settings(out["stage2"]).items() if k not in unread}
        if "backward" in out and backward.get("strategy") != "hidden-distill":
            out["backward"].pop("distill_residual", None)  # only hidden-distill's stages read it
    if "flow" in out and out["flow"].get("coupling") == LATER_DEFAULTS["coupling"]:  # as for the keys below
        out["flow"] = {k: v for k, v in out["flow"].items() if k != "coupling"}
    for stage in ("stage1", "stage2"):  # the record hashes of runs before `schedule` and `noise` existed stand
        for key in ("schedule", "noise"):
            if stage in out and key in out[stage] and out[stage][key] == LATER_DEFAULTS[key]:
                del out[stage][key]
    if "sample" in out:
        sample = out["sample"]
        jacobi = sample.get("decoder") == "jacobi"
        unread = [k for k in EXACT_ONLY_SAMPLING if not exact or (k in JACOBI_SETTINGS and not jacobi)]
        unread += [k for k in PEER_SAMPLING if not peer]
        if not sample.get("cfg_scale"):
            unread.append("cfg_sweep")
        out["sample"] = {k: v for k, v in sample.items() if k not in unread}
    return out


def config_id(config: Mapping[str, Any], micro_batch: int | None = None) -> str:
    """A record's hash: the settings of a resolved config (RunConfig.to_dict()) the run reads and, when the training
    batch was split into micro-batches (each draws its own randomness), their size. The seed is not part of it:
    seeds of one config share it, and the report averages seeds only within one config hash."""
    return _hash(read_settings(config), micro_batch)


def _hash(config: Mapping[str, Any], micro_batch: int | None) -> str:
    return config_hash(dict(config) if micro_batch is None else {"config": dict(config), "micro_batch": micro_batch})


def record_config_hash(rec: Mapping[str, Any]) -> str:
    """A record's hash, recomputed from its config (never trusted from its `config_hash` field)."""
    config = rec.get("config")
    return config_id(config if isinstance(config, dict) else {}, rec.get("micro_batch"))


def earlier_hashes(rec: Mapping[str, Any]) -> list[str]:
    """The hashes earlier code named this record by (the whole config; the config less unread perceptual settings),
    so records moved aside under them still read."""
    config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    perceptual = {**config, "stage2": without_unused_settings(config["stage2"])} if "stage2" in config else config
    return [_hash(config, rec.get("micro_batch")), _hash(perceptual, rec.get("micro_batch"))]


def config_overrides(config: Mapping[str, Any], default: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted keys the run of `config` reads whose value differs from `default`'s (both RunConfig.to_dict()
    forms): settings the run does not read are no difference."""
    a, b = flatten(read_settings(config)), flatten(default)
    return {k: a[k] for k in sorted(a) if a[k] != b.get(k)}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"stage2": {"steps": 100}} -> {"stage2.steps": 100}, tuples as lists."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def overrides_label(overrides: Mapping[str, Any] | None) -> str:
    """`stage2.steps=100, micro_batch=8`: how a row's config differs from its variant's default ("" for none)."""
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted((overrides or {}).items()))


# ---------------------------------------------------------------------------------------------------- run identity

@dataclass(frozen=True)
class RunIdentity:
    """What a record is keyed by beyond (scale, ablation, variant, seed): its config hash, and how the config
    differs from the variant's default (empty: the readable file name)."""

    config_hash: str
    overrides: dict[str, Any]
    micro_batch: int | None


def run_identity(cfg: RunConfig, default: RunConfig, micro_batch: int | None) -> RunIdentity:
    """The identity of running `cfg` (a variant resolved with any overrides; `default`: the same variant without
    them) trained at `micro_batch` (None: one pass per batch)."""
    micro = cfg.effective_micro_batch(micro_batch)
    overrides = config_overrides(cfg.to_dict(), default.to_dict())
    if micro is not None:
        overrides["micro_batch"] = micro
    return RunIdentity(config_id(cfg.to_dict(), micro), overrides, micro)
