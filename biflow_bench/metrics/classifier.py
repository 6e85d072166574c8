"""The domain classifier: a small CNN the suite trains on the scale's own training split, and the metrics it gives.

    acc_cls    fraction of class-conditional samples the classifier puts in their label's class
    conf_cls   the classifier's mean softmax probability of the label (how sure it is, right or wrong)
    fd_cls     Frechet distance in its penultimate (ReLU) features against held-out real images

These judge samples by the data's own classes, independent of ImageNet features (so perceptual-loss variants, which
train on ImageNet features, are judged fairly). The classifier is deterministic from its seed and cached like every
artifact: <cache>/classifier/<key>/classifier.pt with a .sha256 sidecar, key = hash of the dataset and its config;
a corrupted or foreign file is reported by name and rebuilt. Its test accuracy (on the whole held-out split) travels
with it and goes into every record (`cls_test_acc`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import config_hash
from ..data import DataSplits, batch_indices
from ..files import CorruptArtifact, atomic_torch_save, remove_artifact, verified_torch_load
from .frechet import feature_stats, frechet_bootstrap_std, frechet_distance


@dataclass(frozen=True)
class ClassifierConfig:
    image_size: int
    in_channels: int = 1
    num_classes: int = 10
    width: int = 16  # channels of the first two convolutions; the third has twice as many
    features: int = 128  # penultimate width: the space of fd_cls
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


def classifier_config(splits: DataSplits) -> ClassifierConfig:
    """The classifier trained for a dataset: about two epochs of Fashion-MNIST; for the small digits set, 9 epochs
    of its 1,437 training images. Each is accurate enough to judge samples and cheap to train (docs/decisions.md);
    its test accuracy is in every record."""
    train = splits.train
    _, c, h, _ = train.images.shape
    steps = 1000 if len(train) > 10_000 else 200
    batch = 128 if len(train) > 10_000 else 64
    return ClassifierConfig(image_size=h, in_channels=c, num_classes=train.num_classes, steps=steps, batch_size=batch)


class DomainClassifier(nn.Module):
    """conv3-BN-ReLU x2, max-pool, conv3-BN-ReLU, max-pool, then a linear layer to `features` (ReLU) and the logits."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        w = cfg.width

        def conv(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.body = nn.Sequential(*conv(cfg.in_channels, w), *conv(w, w), nn.MaxPool2d(2), *conv(w, 2 * w),
                                  nn.MaxPool2d(2), nn.Flatten())
        side = cfg.image_size // 4
        self.penultimate = nn.Sequential(nn.Linear(2 * w * side * side, cfg.features), nn.ReLU())
        self.head = nn.Linear(cfg.features, cfg.num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, penultimate features) of images in [-1, 1]."""
        f = self.penultimate(self.body(x))
        return self.head(f), f


def quantize(images: Tensor) -> Tensor:
    """[-1, 1] images as an 8-bit PNG would hold them (what fd_effnet sees too): clamp, round to 256 levels."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def classify(model: DomainClassifier, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """(logits, features) of [-1, 1] images after 8-bit quantisation, in eval mode, float32 on the CPU."""
    model.eval()
    logits, feats = [], []
    for i in range(0, images.shape[0], batch_size):
        lg, f = model(quantize(images[i : i + batch_size].float()))
        logits.append(lg)
        feats.append(f)
    return torch.cat(logits), torch.cat(feats)


def label_accuracy(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(acc_cls, conf_cls): the fraction with argmax logit == label, and the mean softmax probability of the label."""
    probs = logits.double().softmax(-1)
    acc = (logits.argmax(-1) == labels).double().mean()
    conf = probs.gather(1, labels.view(-1, 1)).mean()
    return float(acc), float(conf)


def label_accuracy_se(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """Standard errors of acc_cls and conf_cls over the images: std / sqrt(n) of the per-image hit (0/1) and label
    probability (population std; for the hits sqrt(acc (1 - acc) / n)). The noise of one run, as the bootstrap std
    is for the Frechet distances."""
    probs = logits.double().softmax(-1)
    hits = (logits.argmax(-1) == labels).double()
    conf = probs.gather(1, labels.view(-1, 1)).view(-1)
    n = len(labels)
    return float(hits.std(correction=0) / n**0.5), float(conf.std(correction=0) / n**0.5)


def train_classifier(cfg: ClassifierConfig, splits: DataSplits) -> tuple[DomainClassifier, dict[str, float]]:
    """Adam with cosine decay, batches from `batch_indices(seed)`: the same weights for the same seed and data."""
    torch.manual_seed(cfg.seed)
    model = DomainClassifier(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    train = splits.train
    start = time.perf_counter()
    model.train()
    for _, idx in zip(range(cfg.steps), batch_indices(len(train), cfg.batch_size, cfg.seed)):
        logits, _ = model(quantize(train.images[idx]))
        loss = F.cross_entropy(logits, train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    logits, _ = classify(model, splits.test.images)
    acc, _ = label_accuracy(logits, splits.test.labels)
    return model.eval(), {"test_accuracy": acc, "seconds": seconds, "steps": cfg.steps}


def classifier_key(dataset: str, cfg: ClassifierConfig) -> str:
    return config_hash({"dataset": dataset, "classifier": asdict(cfg)})


def get_classifier(dataset: str, splits: DataSplits, cache_dir: Path,
                   cfg: ClassifierConfig | None = None) -> tuple[DomainClassifier, dict]:
    """The dataset's classifier from the cache, trained (and cached) on a miss; meta has test_accuracy, key, cached."""
    cfg = cfg or classifier_config(splits)
    key = classifier_key(dataset, cfg)
    path = cache_dir / "classifier" / key / "classifier.pt"
    if path.exists():
        try:
            blob = verified_torch_load(path)
            try:
                if blob["config"] != asdict(cfg):
                    raise CorruptArtifact(f"{path}: holds a classifier of another config than its key (moved file?)")
                model = DomainClassifier(cfg)
                model.load_state_dict(blob["state_dict"])
                meta = dict(blob["meta"])
            except (KeyError, TypeError, RuntimeError) as e:
                raise CorruptArtifact(f"{path}: not a classifier artifact of this version ({e})") from None
            return model.eval(), {**meta, "key": key, "cached": True}
        except CorruptArtifact as e:
            print(f"warning: {e}; rebuilding it", file=sys.stderr)
            remove_artifact(path)
    model, meta = train_classifier(cfg, splits)
    atomic_torch_save({"config": asdict(cfg), "state_dict": model.state_dict(), "meta": meta}, path)
    return model, {**meta, "key": key, "cached": False}


def classifier_metrics(model: DomainClassifier, images: Tensor, labels: Tensor | None,
                       reference: tuple[np.ndarray, np.ndarray], bootstrap: int = 10,
                       seed: int = 0) -> dict[str, float]:
    """acc_cls / conf_cls with their standard errors (when labels are given), fd_cls against the real images' feature (mu, sigma), and fd_cls_std,
    its bootstrap std (`frechet_bootstrap_std`, as for fd_effnet)."""
    logits, feats = classify(model, images)
    out: dict[str, float] = {}
    if labels is not None:
        out["acc_cls"], out["conf_cls"] = label_accuracy(logits, labels)
        out["acc_cls_std"], out["conf_cls_std"] = label_accuracy_se(logits, labels)
    f = feats.double().numpy()
    out["fd_cls"] = frechet_distance(*feature_stats(f), *reference)
    out["fd_cls_std"] = frechet_bootstrap_std(f, *reference, bootstrap, seed) if bootstrap >= 2 else math.nan
    return out


def reference_features_stats(model: DomainClassifier, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of real images in the classifier's penultimate features."""
    return feature_stats(classify(model, images)[1].double().numpy())
