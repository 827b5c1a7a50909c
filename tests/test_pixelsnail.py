"""What is PixelSNAIL's own: the code before each position reaches it at every row start (the blind spot
of the first releases, which folders saved then keep), and a config without an attention layer is refused."""
from __future__ import annotations

import pytest
import torch

from stage2_prior import Prior, PriorConfig


def seen_by(model: Prior, positions: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    """For each (row, column): which positions of the grid its logits depend on, (h, w) bool."""
    height, width = model.config.latent_shape
    codes = torch.randint(0, model.config.vocab_size, (2, height, width), generator=torch.Generator().manual_seed(0))
    embedded = model.embed(codes[..., None]).detach().requires_grad_(True)
    model.embed = lambda _: embedded
    try:
        logits = model(codes)
        seen = {}
        for row, column in positions:
            (gradient,) = torch.autograd.grad(logits[:, :, row, column].sum(), embedded, retain_graph=True)
            seen[(row, column)] = gradient.abs().sum((0, 1)) > 0
        return seen
    finally:
        del model.embed


@pytest.mark.parametrize("full_context", [True, False])
def test_every_row_start_sees_the_last_code_of_the_row_above_at_32x32(full_context):
    """The case the review found, at its size: 32x32, 12 gated layers, attention after every 4th. Without the
    code before each position in the attention's stream, columns 0-18 of every row are blind to the last code
    of the row above (the vertical stack's window reaches column 19 after 12 layers); with it, nothing is."""
    torch.manual_seed(0)
    model = Prior.from_config(PriorConfig(arch="pixelsnail", vocab_size=8, latent_shape=(32, 32), hidden_channels=8,
                                          num_layers=12, dropout=0.0,
                                          options=dict(num_heads=2, full_context=full_context))).double()
    row_starts = [(row, 0) for row in range(1, 32)]
    row_five = [(5, column) for column in range(21)]
    seen = seen_by(model, row_starts + row_five)
    for row, column in row_starts:
        assert bool(seen[(row, column)][row - 1, 31]) == full_context, (row, column)
    for column in range(21):  # the legacy network: blind up to column 18, as the review measured
        assert bool(seen[(5, column)][4, 31]) == (full_context or column >= 19), column
    if full_context:
        assert all(seen[(5, column)].flatten()[:5 * 32 + column].all() for column in range(21))


def test_a_pixelsnail_without_attention_is_refused():
    for layers, every in ((4, 4), (2, 4), (1, 1)):
        with pytest.raises(ValueError, match="has no attention layer.*; pass --(attention-every|num-layers 2)"):
            PriorConfig(arch="pixelsnail", num_layers=layers, options=dict(attention_every=every))
    PriorConfig(arch="pixelsnail", num_layers=5, options=dict(attention_every=4))  # one after layer 4
