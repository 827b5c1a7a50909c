"""The tokenizer levels a prior generates: its one level (codes, top, bottom), or every scale of a multi-scale
pyramid, which the prior reads as one sequence; a mixin of `Prior` (it reads only `self.config`)."""
from __future__ import annotations

import torch

from shared.codes import SINGLE_LEVEL, scale_level_name


class TokenizerLevels:
    """`level_names`, `split_levels` and `join_levels` of a prior with a `config` (a PriorConfig)."""

    @property
    def level_names(self) -> tuple[str, ...]:
        """The levels of the tokenizer's codes this prior generates: its one level, or every scale of a pyramid."""
        if self.config.scales is not None:
            return tuple(scale_level_name(side) for side in self.config.scales)
        return (self.config.level or SINGLE_LEVEL,)

    def split_levels(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Public codes -> {level: grid}, as the tokenizer decodes them (a pyramid: (B, s, s) per scale)."""
        if self.config.scales is None:
            return {self.level_names[0]: codes}
        grids, start = {}, 0
        for name, side in zip(self.level_names, self.config.scales):
            grids[name] = codes[:, start:start + side * side].reshape(len(codes), side, side)
            start += side * side
        return grids

    def join_levels(self, grids: dict[str, torch.Tensor]) -> torch.Tensor:
        """{level: grid} -> public codes (the inverse of `split_levels`)."""
        if self.config.scales is None:
            return grids[self.level_names[0]]
        return torch.cat([grids[name].flatten(1) for name in self.level_names], dim=1)  # (B, N)
