"""Logits for one draw: the full forward (method "naive", the reference), or an arch's incremental state
(methods "cached", "compiled" and "graph").

"compiled" runs the state's `chain` through torch.compile, "graph" in CUDA graphs (torch.compile's
reduce-overhead mode). Within a sample the chain's shapes never change, so it compiles once per
batch size and model; after one such change the changed sizes are compiled as dynamic (dynamic=None),
which keeps a session below dynamo's recompile limit. For CUDA graphs the tensors a chain reads
(`graph_inputs`) are copied into tensors held by the caller's pool (a `Sampler`) and marked static:
the same addresses for every state of these shapes, so a graph recorded for one sample replays for the
next (new addresses would make torch record it again, and stop graphing after 128 such re-records)
and nothing is copied per replay. So one such state per pool and shapes is in use at a time.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from stage2_prior.conditioning import Context

COMPILED_CHAINS: dict[tuple[Callable, str], Callable] = {}  # (function, method) -> its compiled form, per process


def compiled_chain(function: Callable, method: str) -> Callable:
    """`function` (a state's per-position chain) through torch.compile; method "graph" adds CUDA graphs."""
    key = (function, method)
    if key not in COMPILED_CHAINS:
        mode = "reduce-overhead" if method == "graph" else "default"
        COMPILED_CHAINS[key] = torch.compile(function, mode=mode, dynamic=None)
    return COMPILED_CHAINS[key]


def compile_state(state, method: str, pool: dict) -> None:
    """Make `state` run its chain compiled (and for "graph", read its inputs from `pool`'s fixed tensors)."""
    state.chain = compiled_chain(type(state).chain, method)
    state.fixed_shapes = True
    if method != "graph":
        return

    def fixed(name: str, index: int, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        key = (name, index, tuple(tensor.shape), tensor.dtype, tensor.device)
        if key not in pool:
            pool[key] = torch.empty_like(tensor)
            torch._dynamo.mark_static_address(pool[key])
        return pool[key].copy_(tensor)

    for name in state.graph_inputs:
        value = getattr(state, name)
        if value is None:  # an input this state does not use (a prior without text: no caption memory)
            continue
        if isinstance(value, (list, tuple)):
            setattr(state, name, type(value)(fixed(name, index, tensor) for index, tensor in enumerate(value)))
        else:
            setattr(state, name, fixed(name, 0, value))


class NaiveSteps:
    """The reference: one full forward of the network per draw."""

    passes_per_draw = True  # every draw is one network pass

    def __init__(self, model, context: Context) -> None:
        self.model, self.context = model, context
        self.conditioning = model.conditioning(context)

    def logits(self, codes: torch.Tensor, row: int, column: int, depth: int) -> torch.Tensor:
        """Codes (B, h, w, D) holding every code before the draw -> its logits (B, V)."""
        return self.model.stack_logits(codes, self.conditioning)[:, row, column, depth]

    def block_logits(self, codes: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Codes (B, h, w, 1) holding every code before position `first` -> the logits (B, count, V) of a run of
        positions whose features read nothing of the run (`Prior.parallel_runs`)."""
        return self.model.stack_logits(codes, self.conditioning).flatten(1, 2)[:, first:first + count, 0]

    def reorder(self, index: torch.Tensor) -> None:
        self.context = self.context.select(index)
        self.conditioning = self.model.conditioning(self.context)


class CachedSteps:
    """The arch's incremental state: the features at a draw from what earlier draws left behind, then the head."""

    def __init__(self, model, context: Context, batch: int, method: str, pool: dict) -> None:
        self.model = model
        self.state = model.start(batch, model.conditioning(context))
        if method in ("compiled", "graph"):
            compile_state(self.state, method, pool)
        self.features: torch.Tensor | None = None
        # a network that orders a stack by channel groups computes new features for each entry
        self.passes_per_draw = model.config.channel_groups > 1

    def logits(self, codes: torch.Tensor, row: int, column: int, depth: int) -> torch.Tensor:
        if depth == 0 or self.passes_per_draw:
            self.features = self.state.step(codes, row, column, depth)  # (B, C)
        return self.model.head.entry(self.features, codes[:, row, column], depth)  # (B, V)

    def block_logits(self, codes: torch.Tensor, first: int, count: int) -> torch.Tensor:
        features = self.state.block(codes, first, count)  # (B, count, C)
        self.features = None
        return self.model.head.entry(features, codes.flatten(1, 2)[:, first:first + count], 0)  # (B, count, V)

    def reorder(self, index: torch.Tensor) -> None:
        self.state.reorder(index)
        self.features = None if self.features is None else self.features[index]
