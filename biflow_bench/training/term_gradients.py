"""Which term of stage 2's objective drives G? Each term's gradient on G's parameters, on fresh batches: its norm,
its share of the summed norms, and its cosine with the whole objective's gradient. With eq. 7's re-weighting
(p = 1) every term is about 1 in value, so how much say a term has is a matter of its gradient, which this measures.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..config import Stage2Config
from ..data import ImageDataset
from ..models.biflow import BiFlow
from ..models.tarflow import TARFlow
from .losses import adaptive_denominator, inverse_terms, perceptual_weight, stage2_targets


def term_gradients(g: BiFlow, terms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each term's gradient on G's trainable parameters, flattened into one vector."""
    params = [p for p in g.parameters() if p.requires_grad]
    out = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        out[name] = torch.cat([(torch.zeros_like(p) if gr is None else gr).flatten().float()
                               for p, gr in zip(params, grads, strict=True)])
    return out


def term_shares(grads: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per term: the gradient's norm, its share of the summed norms, and its cosine with the sum of the gradients
    (the whole objective's)."""
    total = torch.stack(list(grads.values())).sum(0)
    norms = {name: float(v.norm()) for name, v in grads.items()}
    summed = sum(norms.values())
    return {name: {"norm": norms[name], "share": norms[name] / summed if summed > 0 else float("nan"),
                   "cosine": float(torch.nn.functional.cosine_similarity(v, total, dim=0))}
            for name, v in grads.items()}


def stage_terms(stages: list[Tensor], s2: Stage2Config, weight: float) -> dict[str, Tensor]:
    """A pyramid distance's term (eq. 7, D = the sum of its stages' summands D_s) split by stage: weight *
    mean_b D_s / sg((D + c)^p); they sum to the term, so their gradients split its gradient."""
    scale = adaptive_denominator(torch.stack(stages).sum(0), s2.adaptive_c, s2.adaptive_p)
    return {f"stage {i + 1}": weight * (d / scale).mean() for i, d in enumerate(stages)}


def measure_term_shares(g: BiFlow, flow: TARFlow, data: ImageDataset, s2: Stage2Config, *, sigma: float,
                        perceptual: Mapping[str, nn.Module], batches: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """`term_shares` averaged over `batches` fresh training batches (stage 2's batch size, its precision); for an
    LPIPS-style term over a feature pyramid, also each stage's share of that term's gradient ('lpips stage k', its
    cosine with the term's gradient)."""
    gen = torch.Generator().manual_seed(seed)
    flow.eval().requires_grad_(False)
    g.train()
    sums: dict[str, dict[str, float]] = {}
    for _ in range(batches):
        idx = torch.randint(len(data), (s2.batch_size,), generator=gen)
        x = data.images[idx]
        y = data.labels[idx] if g.config.num_classes else None
        z, targets = stage2_targets(flow, x, y, sigma, g.config.denoise, gen)
        with torch.autocast("cpu", torch.bfloat16, enabled=s2.precision == "bf16"):
            terms, _ = inverse_terms(g, z, targets, y, s2, perceptual=perceptual, generator=gen)
        rows = term_shares(term_gradients(g, terms))
        for name, net in perceptual.items():
            if getattr(net, "last_stages", None):
                split = stage_terms(net.last_stages, s2, perceptual_weight(s2, name))
                rows |= {f"{name} {k}": v for k, v in term_shares(term_gradients(g, split)).items()}
        for name, row in rows.items():
            acc = sums.setdefault(name, dict.fromkeys(row, 0.0))
            for k, v in row.items():
                acc[k] += v / batches
    return sums
