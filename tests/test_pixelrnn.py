"""PixelRNN (Row LSTM, Diagonal BiLSTM): causality, receptive fields, the cached state against the full
forward, cached against naive sampling and beam search, save and load."""
from __future__ import annotations

import pytest
import torch

from conftest import cached_logit_error
from stage2_prior import PixelRNN, Prior, PriorConfig

ARCHS = ["row_lstm", "diagonal_bilstm"]


def tiny_rnn(arch: str, latent_shape=(4, 6), num_layers=2, kernel_size=3, depth=1, num_classes=None,
             condition_shape=None, label_dropout=0.0, seed=0) -> PixelRNN:
    torch.manual_seed(seed)
    condition = dict(condition_vocab_size=5, condition_shape=condition_shape) if condition_shape else {}
    model = Prior.from_config(PriorConfig(vocab_size=7, latent_shape=latent_shape, depth=depth, num_classes=num_classes,
                                          hidden_channels=8, num_layers=num_layers, kernel_size=kernel_size, arch=arch,
                                          label_dropout=label_dropout, **condition))
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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("conditioned", [False, True])
def test_model_is_causal(arch, conditioned):
    extra = dict(num_classes=3, condition_shape=(2, 3)) if conditioned else {}
    model = tiny_rnn(arch, **extra)
    labels = torch.tensor([2]) if conditioned else None
    condition = torch.randint(0, 5, (1, 2, 3)) if conditioned else None
    # the first and last column of rows, and positions inside them (grid 4 x 6)
    for position in (0, 1, 5, 6, 11, 14, 18, 23):
        grads = dependency(model, position, labels, condition)
        assert grads[position:].max() == 0, f"position {position} sees the future"
        if position % 6:
            assert grads[position - 1] > 0  # the code just left of it
    # the perturbation form: changing codes at positions >= p leaves the logits up to p unchanged
    codes = torch.randint(0, 7, (2, 4, 6))
    labels, condition = (labels.expand(2), condition.expand(2, -1, -1)) if conditioned else (None, None)
    position = 11
    changed = codes.clone().flatten(1)
    changed[:, position:] = torch.randint(0, 7, changed[:, position:].shape)
    with torch.no_grad():
        before = model(codes, labels, condition).flatten(2)[:, :, :position + 1]
        after = model(changed.view_as(codes), labels, condition).flatten(2)[:, :, :position + 1]
        assert torch.equal(before, after)
        if conditioned:  # the label and the condition map do reach the logits
            assert not torch.allclose(model(codes, labels, condition), model(codes, (labels + 1) % 3, condition))
            assert not torch.allclose(model(codes, labels, condition), model(codes, labels, (condition + 1) % 5))


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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("conditioned", [False, True])
def test_cached_logits_equal_the_full_forward(arch, depth, conditioned):
    if conditioned:
        model = tiny_rnn(arch, latent_shape=(4, 6), depth=depth, num_classes=3, condition_shape=(2, 3), num_layers=3)
        labels, condition = torch.tensor([0, 2, 1]), torch.randint(0, 5, (3, 2, 3))
    else:
        model = tiny_rnn(arch, latent_shape=(5, 3), depth=depth, num_layers=3)
        labels, condition = None, None
    error, largest = cached_logit_error(model, labels, condition)
    assert error < 1e-5, f"cached logits differ from the full forward by {error:.3g}"
    assert largest > 1  # logits that vary, so the comparison means something


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_sampler_equals_naive(arch):
    model = tiny_rnn(arch, latent_shape=(3, 5), num_classes=2)
    labels = torch.tensor([0, 1, 1])
    for options in (dict(), dict(temperature=0.7, top_k=3), dict(top_p=0.8)):
        naive = model.sample(3, labels=labels, seed=5, method="naive", **options)
        cached = model.sample(3, labels=labels, seed=5, method="cached", **options)
        assert torch.equal(naive, cached)
    codes = torch.randint(0, 7, (2, 3, 5))
    known = torch.zeros(2, 3, 5, dtype=torch.bool)
    known[:, 0] = True  # the top row is known
    known[1, 2, 4] = True
    completed = model.complete(codes, known, labels=1, seed=1, method="cached")
    assert torch.equal(completed[known], codes[known])
    assert torch.equal(completed, model.complete(codes, known, labels=1, seed=1, method="naive"))


@pytest.mark.parametrize("arch", ARCHS)
def test_guided_stacked_sampling_equals_naive(arch):
    model = tiny_rnn(arch, latent_shape=(4, 3), depth=2, num_classes=3, label_dropout=0.1, condition_shape=(2, 3))
    condition = torch.randint(0, 5, (2, 2, 3))
    options = dict(labels=torch.tensor([2, 0]), condition=condition, seed=3, guidance_scale=2.0, temperature=0.9)
    cached = model.sample(2, method="cached", **options)
    assert cached.shape == (2, 4, 3, 2)
    assert torch.equal(cached, model.sample(2, method="naive", **options))


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_cached_equals_naive(arch):
    model = tiny_rnn(arch, latent_shape=(3, 4), num_classes=3)
    labels = torch.tensor([0, 2])
    cached = model.beam_search(2, labels=labels, num_beams=3, method="cached")
    naive = model.beam_search(2, labels=labels, num_beams=3, method="naive")
    assert torch.equal(cached.codes, naive.codes)
    assert torch.equal(cached.log_prob, naive.log_prob)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    model = tiny_rnn(arch, num_classes=3, condition_shape=(2, 3))
    model.save_pretrained(tmp_path / "prior")
    loaded = Prior.from_pretrained(tmp_path / "prior")
    assert type(loaded) is PixelRNN and loaded.config == model.config
    codes, condition = torch.randint(0, 7, (2, 4, 6)), torch.randint(0, 5, (2, 2, 3))
    with torch.no_grad():
        assert torch.equal(loaded(codes, 1, condition), model(codes, 1, condition))


@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_reaches_every_layer(arch):
    model = tiny_rnn(arch, num_classes=3).train()
    loss = model.nll(torch.randint(0, 7, (4, 4, 6)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    for layer in model.layers:
        assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in layer.parameters())
