"""A prior with a trained prior's logit spread, without training: what the exactness tests and the guard's
benchmark (benchmarks/guard.py) sample from.

Random weights give logits far flatter or far sharper than a trained model's, which would make draws near
a CDF boundary (the guard's hard cases) too rare or too common. `trained_scale_prior` scales every weight of
a freshly built prior by one factor, found by bisection, so that the logits on random codes have the
standard deviation `std` (about 6 for the trained digit priors of docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Any

import torch

from stage2_prior.config import PriorConfig
from stage2_prior.prior import Prior
from stage2_prior.registry import arch_spec, trained_scale


def trained_scale_prior(side: int, std: float = 6.0, **config: Any) -> Prior:
    """A prior of `config` (flat keywords of `PriorConfig.build`; the default arch) over 512 codes on a side x side
    grid (a pyramid arch: the default scales of that side), its weights scaled to a logit spread of `std`."""
    torch.manual_seed(0)
    if arch_spec(config.get("arch", PriorConfig.arch)).reads == "scales":
        config = {**trained_scale(config["arch"], side=side), **config}
    model = Prior.from_config(PriorConfig.build(vocab_size=512, **{"latent_shape": (side, side), **config})).eval()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    codes = torch.randint(0, 512, (4, *model.code_shape))
    labels = torch.zeros(4, dtype=torch.long) if config.get("num_classes") else None
    low, high = 0.5, 4.0
    for _ in range(16):  # bisect a common weight multiplier
        middle = (low + high) / 2
        model.load_state_dict({name: tensor * middle if tensor.is_floating_point() else tensor
                               for name, tensor in initial.items()})
        with torch.no_grad():
            spread = model(codes, labels).std().item()
        low, high = (middle, high) if spread < std else (low, middle)
    return model
