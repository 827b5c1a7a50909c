"""The optional part of the arch contract: an incremental state, which makes the cached sampler possible.

An arch that can compute its features position by position supplies a subclass of `IncrementalState`
(`Prior.state_class`). The sampler makes one per batch (`Prior.start(batch, conditioning)`) and
asks it, in raster-then-stack order, for the features at each draw:

- `step(codes, row, column, depth) -> (B, C)`: `codes` (B, h, w, D) holds every code before
  (row, column, depth); the features must equal the full forward's there, up to rounding (the
  sampler measures that, and a state that is off by more than rounding is reported as a bug).
  An arch whose head orders the stack (no channel groups) is asked once per position (depth 0).
- `reorder(index)`: keep rows `index` of the batch (beam search).
- `window(codes, start, count) -> (B, count, C)` (optional): the features of `count` positions from
  `start` at once, from the state of the positions before `start` and the codes in `codes` (guesses
  for the window), without advancing the state; `commit(codes, start, count)` then advances it over
  positions whose codes have settled (the default steps through them). Windowed Jacobi decoding
  (`method="jacobi"` with `window=W`) needs it; a state without one does not offer windows.
- `block(codes, start, count) -> (B, count, C)` (archs with `Prior.parallel_runs`): the features of a run of
  positions that read nothing of each other, from one pass, advancing the state over them (VAR: a scale).
- `chain` (optional): the per-position work as a module-level function of tensors whose shapes do
  not change over the grid. Method "compiled" runs it through torch.compile, "graph" in CUDA graphs
  (`stage2_prior.decoding.steps`); a state without one offers neither. Such a state passes the
  position through `position_input` and lists in `graph_inputs` the tensors its chain reads besides
  module parameters (weights it prepared, caches), which CUDA graphs need at fixed addresses.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch


class IncrementalState:
    """Base of every arch's incremental state (see the module docstring)."""

    chain: ClassVar[Callable | None] = None  # the compiled path's per-position function; None: no compiled step
    graph_inputs: ClassVar[tuple[str, ...]] = ("position_tensor",)

    def __init__(self, device: torch.device) -> None:
        self.position_tensor = torch.zeros(1, dtype=torch.long, device=device)
        self.fixed_shapes = False  # set when the chain is compiled: it then takes the position as a tensor

    def position_input(self, position: int) -> int | torch.Tensor:
        """The raster position as the chain takes it: the int, or with fixed shapes the (1,) tensor
        holding it (a compiled chain specialises on ints, and would recompile at every position)."""
        if not self.fixed_shapes:
            return position
        return self.position_tensor.fill_(position)

    def step(self, codes: torch.Tensor, row: int, column: int, depth: int) -> torch.Tensor:
        """Features (B, C) at (row, column) for stack entry `depth`."""
        raise NotImplementedError

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` of the batch (beam search)."""
        raise NotImplementedError

    def block(self, codes: torch.Tensor, start: int, count: int) -> torch.Tensor:
        """Features (B, count, C) of a run of positions (`Prior.parallel_runs`) from one pass; the state advances."""
        raise NotImplementedError

    def window(self, codes: torch.Tensor, start: int, count: int) -> torch.Tensor:
        """Features (B, count, C) of positions start .. start + count - 1 without advancing the state."""
        raise NotImplementedError

    def commit(self, codes: torch.Tensor, start: int, count: int) -> None:
        """Advance the state over positions start .. start + count - 1, whose codes in `codes` are final."""
        width = codes.shape[2]
        for position in range(start, start + count):
            self.step(codes, *divmod(position, width), 0)

    @classmethod
    def has_window(cls) -> bool:
        return cls.window is not IncrementalState.window
