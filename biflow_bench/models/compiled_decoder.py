"""torch.compile for the exact inverse's token step (tarflow.FlowBlock.reverse with `compiled`): the per-operator
overhead that dominates small batches fused away. The step is the serial decoder's own (FlowBlock._encode and
_update, CausalBlock.decode) over a cache of all N slots with those past the new token masked, so it has the same
shapes at every position and one graph serves every position, block and call at a batch size."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import layers


@functools.cache
def compiled_step(step: Callable, backend: str) -> Callable:
    """`step` under torch.compile: static shapes, inductor's C++ wrapper (layers.compile_options), one graph."""
    options = layers.compile_options(backend, cpp_wrapper=True)
    # one graph per batch size, guidance on or off, temperature rows and grad mode: more than dynamo's default 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(step, backend=backend, dynamic=False, fullgraph=True, options=options)
