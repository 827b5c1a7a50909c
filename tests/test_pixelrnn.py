"""What is PixelRNN's own (the contract suite checks the rest): the receptive fields of the Row LSTM (a
triangle) and the Diagonal BiLSTM (everything earlier) at every position, for two kernel sizes."""
from __future__ import annotations

import pytest
import torch

from stage2_prior import PixelRNN, Prior, PriorConfig

def tiny_rnn(arch: str, latent_shape=(4, 6), num_layers=2, kernel_size=3, depth=1, num_classes=None,
             condition_shape=None, label_dropout=0.0, seed=0) -> PixelRNN:
    torch.manual_seed(seed)
    condition = dict(condition_vocab_size=5, condition_shape=condition_shape) if condition_shape else {}
    model = Prior.from_config(PriorConfig(vocab_size=7, latent_shape=latent_shape, depth=depth, num_classes=num_classes,
                                          hidden_channels=8, num_layers=num_layers, options=dict(kernel_size=kernel_size),
                                          arch=arch, label_dropout=label_dropout, **condition))
    for parameter in model.parameters():  # larger than default init, so every dependency shows in the logits
        parameter.data.normal_(0, 0.5)  # gate pre-activations of a few units: not saturated at this scale
    return model.eval()


def dependency(model: PixelRNN, position: int, labels=None, condition=None, grids: int = 4) -> torch.Tensor:
    """|d logits[p] / d embedded input[q]| summed over channels and a few random grids (so that no
    ReLU of the head that happens to be off hides a dependency), for every raster position q: (h * w,)."""
    height, width = model.config.latent_shape
    codes = torch.randint(0, model.config.vocab_size, (grids, height, width, model.config.depth))
    embedded = model.embed(codes).detach().requires_grad_(True)  # (grids, C, h, w)
    model.embed = lambda _: embedded  # differentiate with respect to the embedded grid
    try:
        labels = None if labels is None else labels.expand(grids)
        condition = None if condition is None else condition.expand(grids, *condition.shape[1:])
        logits = model(model.public(codes), labels, condition)
    finally:
        del model.embed
    row, column = divmod(position, width)
    logits[:, :, row, column].sum().backward()
    return embedded.grad.abs().sum((0, 1)).flatten()  # (h*w,)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_diagonal_bilstm_sees_every_earlier_position(kernel_size):
    # every position, including those the first convolution alone would leave blind to the last code
    # of the row above (the right-to-left direction reads the codes of that row directly)
    height, width = 5, 12
    model = tiny_rnn("diagonal_bilstm", latent_shape=(height, width), kernel_size=kernel_size)
    for position in range(height * width):
        expected = torch.arange(height * width) < position
        assert torch.equal(dependency(model, position) > 0, expected), f"position {position}"


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_row_lstm_receptive_field_is_the_documented_triangle(kernel_size, num_layers):
    height, width, half = 5, 12, kernel_size // 2
    model = tiny_rnn("row_lstm", latent_shape=(height, width), kernel_size=kernel_size, num_layers=num_layers)
    columns = torch.arange(width)
    for position in range(height * width):
        row, column = divmod(position, width)
        expected = torch.zeros(height, width, dtype=torch.bool)
        expected[row] = (columns >= column - (num_layers + 1) * half) & (columns < column)
        for d in range(1, row + 1):  # row - d: columns j - (d + L + 1) r .. j + d r
            expected[row - d] = (columns >= column - (d + num_layers + 1) * half) & (columns <= column + d * half)
        assert torch.equal(dependency(model, position) > 0, expected.flatten()), f"position {position}"
