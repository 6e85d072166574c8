"""What norm control acts on (BiFlow sec. 3.3), measured: the RMS of every state of F's trajectory and the
distribution of F's affine parameters (alpha, mu) before the clip, on held-out data.

A record carries these so a norm-control table can show what the clip did to the norms it is meant to control, and
so the clip value c can be chosen where it binds: `clip_percentile` says at which percentile of |pre-clip parameter|
c sits (100 means the clip never reaches a parameter; the smooth clip c * tanh(a / c) compresses a by 24% at |a| = c).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..models.tarflow import TARFlow

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@torch.no_grad()
def flow_norms(flow: TARFlow, x: Tensor, y: Tensor | None, batch_size: int = 250) -> dict[str, Any]:
    """Trajectory RMS per state (x_0 = x ... x_B = z), and per block the percentiles of |alpha| and |mu| before
    the clip, with the percentile of the pooled |parameters| at which the clip value sits."""
    raw: list[list[Tensor]] = [[] for _ in flow.blocks]
    hooks = [block.proj_out.register_forward_hook(lambda _m, _a, out, k=k: raw[k].append(out[:, :-1].float()))
             for k, block in enumerate(flow.blocks)]  # the last position predicts no token
    sq_sums: list[float] = []
    try:
        for i in range(0, len(x), batch_size):
            yb = None if y is None else y[i : i + batch_size]
            trajectory = flow(x[i : i + batch_size], yb).trajectory
            sums = [float(t.double().pow(2).sum()) for t in trajectory]
            sq_sums = [a + b for a, b in zip(sq_sums, sums)] if sq_sums else sums
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, Any] = {"trajectory_rms": [(s / x.numel()) ** 0.5 for s in sq_sums], "blocks": []}
    pooled = []
    for chunks in raw:
        alpha, mu = torch.cat(chunks).chunk(2, dim=-1)
        pooled += [alpha.abs().flatten(), mu.abs().flatten()]
        out["blocks"].append({
            name: {f"p{q:g}": float(torch.quantile(v.abs().flatten()[:1_000_000], q / 100)) for q in PERCENTILES}
            | {"max": float(v.abs().max())}
            for name, v in (("alpha", alpha), ("mu", mu))
        })
    clip = flow.config.clip
    out["clip"] = clip
    if clip is not None:
        values = torch.cat(pooled)
        out["clip_percentile"] = float((values < clip).double().mean() * 100)
    return out
