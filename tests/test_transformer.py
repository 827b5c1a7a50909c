"""The decoder-only transformer prior: causality and no blind spot by gradient, its KV cache against the
full forward, cached against naive sampling and beam search, save/load, and its config errors."""
from __future__ import annotations

import pytest
import torch

from conftest import cached_logit_error
from stage2_prior import Prior, PriorConfig, TransformerPrior
from stage2_prior.sampling import SamplingOptions, run, sample_uniforms

GRID = (4, 6)
CONDITION_GRID = (2, 3)  # divides GRID: each condition code covers 2 x 2 positions


def tiny_transformer(num_classes=None, label_dropout=0.0, condition=False, depth=1, position_embedding="2d",
                     seed=0, **config) -> TransformerPrior:
    torch.manual_seed(seed)
    if condition:
        config.update(condition_vocab_size=5, condition_shape=CONDITION_GRID)
    config = PriorConfig(arch="transformer", vocab_size=11, latent_shape=GRID, depth=depth, num_classes=num_classes,
                         label_dropout=label_dropout, hidden_channels=8, num_heads=2, num_layers=2,
                         position_embedding=position_embedding, **config)
    model = Prior.from_config(config)
    for parameter in model.parameters():  # larger than default init, so every dependency shows in the logits
        parameter.data.normal_(0, 0.5)
    return model.eval()


def random_condition(batch: int) -> torch.Tensor:
    return torch.randint(0, 5, (batch, *CONDITION_GRID))


def dependency(model, position: int, labels=None, condition=None) -> torch.Tensor:
    """|d logits[p] / d embedded input[q]| summed over channels and the stack at p, for every raster position q:
    shape (h * w,)."""
    codes = torch.randint(0, model.config.vocab_size, (1, *model.code_shape))
    embedded = model.embed(model.stacked(codes)).detach().requires_grad_(True)  # (1, C, h, w)
    model.embed = lambda _: embedded  # differentiate with respect to the embedded grid
    try:
        logits = model(codes, labels, condition)  # (1, V, h, w[, D])
    finally:
        del model.embed
    row, column = divmod(position, GRID[1])
    logits[0, :, row, column].sum().backward()
    return embedded.grad[0].abs().sum(0).flatten()  # (h*w,)


@pytest.mark.parametrize("depth", [1, 2])
def test_model_is_causal_with_labels_and_condition(depth):
    model = tiny_transformer(num_classes=3, condition=True, depth=depth)
    condition = random_condition(1)
    for position in (0, 1, 5, 6, 13, 23):
        grads = dependency(model, position, labels=1, condition=condition)
        assert grads[position:].abs().max() == 0, f"position {position} sees the future"
    # the perturbation form: changing codes at positions >= p leaves the logits at positions < p, and of the
    # first stack entry at p, unchanged (later entries at p see the earlier ones through the depth head)
    codes = torch.randint(0, 11, (2, *GRID, depth))
    position = 13
    changed = codes.clone().flatten(1, 2)  # (B, h*w, D)
    changed[:, position:] = torch.randint(0, 11, changed[:, position:].shape)
    condition = random_condition(2)
    before, after = (model(model.public(grid), 1, condition).reshape(2, 11, -1, depth)
                     for grid in (codes, changed.view_as(codes)))  # (B, V, h*w, D)
    assert torch.equal(before[:, :, :position], after[:, :, :position])
    assert torch.equal(before[:, :, position, 0], after[:, :, position, 0])
    assert not torch.equal(before[:, :, position + 1], after[:, :, position + 1])


@pytest.mark.parametrize("position_embedding", ["2d", "1d"])
def test_no_blind_spot(position_embedding):
    # attention reads every earlier token: the last position, and the first of the last row, see all before them
    model = tiny_transformer(position_embedding=position_embedding)
    for position in (23, 18):
        assert (dependency(model, position)[:position] > 0).all()


def test_label_and_condition_map_change_the_logits():
    model = tiny_transformer(num_classes=3, condition=True)
    codes = torch.randint(0, 11, (1, *GRID))
    condition = random_condition(1)
    assert not torch.allclose(model(codes, 0, condition), model(codes, 2, condition))
    other = condition.clone()
    other[0, 1, 2] = (other[0, 1, 2] + 1) % 5  # covers rows 2-3, columns 4-5
    changed = (model(codes, 0, condition) - model(codes, 0, other)).abs().amax(1)[0]  # (h, w)
    assert changed[0, 0] > 0  # the first position sees the map through the condition network's 3x3 convolutions


@pytest.mark.parametrize("position_embedding", ["2d", "1d"])
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "labels+map"])
@pytest.mark.parametrize("depth", [1, 2])
def test_kv_cache_equals_full_forward(depth, conditional, position_embedding):
    # a 1d table longer than the grid (the cache reads its first h*w entries); labels include the null class
    extra = dict(max_positions=40) if position_embedding == "1d" else {}
    model = tiny_transformer(num_classes=3 if conditional else None, label_dropout=0.1 if conditional else 0.0,
                             condition=conditional, depth=depth, position_embedding=position_embedding, **extra)
    labels = torch.tensor([0, 2, model.config.null_class]) if conditional else None
    condition = random_condition(3) if conditional else None
    error, _ = cached_logit_error(model, labels, condition)
    assert error <= 1e-5, f"cached logits differ from the full forward by {error:.3g}"


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, top_k=4), dict(top_p=0.8),
                                     dict(strategy="greedy"), dict(precision="float32")],
                         ids=["plain", "temperature+top_k", "top_p", "greedy", "float32"])
def test_cached_sampler_equals_naive(options):
    model = tiny_transformer(num_classes=3, condition=True, depth=2)
    labels, condition = torch.tensor([0, 1, 1]), random_condition(3)
    cached = model.sample(3, labels=labels, condition=condition, seed=5, method="cached", **options)
    assert cached.shape == (3, *GRID, 2)
    assert torch.equal(cached, model.sample(3, labels=labels, condition=condition, seed=5, method="naive", **options))


def test_guided_sampling_cached_equals_naive():
    model = tiny_transformer(num_classes=3, label_dropout=0.1)
    labels = torch.tensor([0, 1, 2, 2])
    cached = model.sample(4, labels=labels, seed=3, guidance_scale=2.0, method="cached")
    assert torch.equal(cached, model.sample(4, labels=labels, seed=3, guidance_scale=2.0, method="naive"))
    assert not torch.equal(cached, model.sample(4, labels=labels, seed=3))  # guidance changes the draws


def test_complete_keeps_known_codes_and_equals_naive():
    model = tiny_transformer(position_embedding="1d")
    codes = torch.randint(0, 11, (2, *GRID))
    known = torch.zeros(2, *GRID, dtype=torch.bool)
    known[:, :2] = True  # the top rows are known
    known[1, 3, 5] = True
    completed = model.complete(codes, known, seed=1)
    assert torch.equal(completed[known], codes[known])
    assert torch.equal(completed, model.complete(codes, known, seed=1, method="naive"))


def trained_scale_transformer(side: int = 6, std: float = 6.0) -> TransformerPrior:
    """The default width (64) and vocabulary (512) with 4 blocks on a side x side grid, every weight N(0, sigma)
    with sigma bisected until the logits spread like a trained model's (std 6), so that attention is sharp."""
    torch.manual_seed(0)
    model = Prior.from_config(PriorConfig(arch="transformer", vocab_size=512, latent_shape=(side, side),
                                          num_layers=4)).eval()
    codes = torch.randint(0, 512, (4, side, side))
    low, high = 0.01, 1.0
    for _ in range(12):
        middle = (low + high) / 2
        generator = torch.Generator().manual_seed(1)
        for parameter in model.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * middle
        with torch.no_grad():
            spread = model(codes).std().item()
        low, high = (middle, high) if spread < std else (low, middle)
    return model


def test_kv_cache_at_trained_scale():
    """Where rounding could break the promise: cached float32 logits stay within half the guard's tolerance of
    float64 ones, and cached sampling (float64 and float32) equals naive sampling."""
    from stage2_prior.sampling import float64_copy, logit_tolerance

    model = trained_scale_transformer()
    codes = model.sample(8, seed=1, precision="float32")[..., None]  # (8, 6, 6, 1)
    double = float64_copy(model)
    reference = double.head_logits(double.features(codes, None, None), codes)  # (8, V, 6, 6, 1) float64
    errors = []
    with torch.inference_mode():
        run(model, "cached", None, None, sample_uniforms(1, 0, 8, 36), codes, torch.ones_like(codes, dtype=torch.bool),
            SamplingOptions(), on_logits=lambda row, column, depth, logits: errors.append(
                (logits.double() - reference[:, :, row, column, depth]).abs().max().item()))
    assert reference.std() > 4 and max(errors) < logit_tolerance(model, "cached") / 2
    cached = model.sample(8, seed=5)
    assert torch.equal(cached, model.sample(8, seed=5, method="naive"))
    assert torch.equal(cached, model.sample(8, seed=5, precision="float32"))


def test_beam_search_cached_equals_naive():
    model = tiny_transformer(num_classes=3, condition=True)
    labels, condition = torch.tensor([0, 2]), random_condition(2)
    cached = model.beam_search(2, labels=labels, num_beams=3, condition=condition, method="cached")
    naive = model.beam_search(2, labels=labels, num_beams=3, condition=condition, method="naive")
    assert torch.equal(cached.codes, naive.codes)
    assert torch.equal(cached.log_prob, naive.log_prob)
    greedy = model.sample(2, labels=labels, condition=condition, strategy="greedy")
    assert (cached.log_prob >= model.log_prob(greedy, labels, condition)).all()  # 3 beams do no worse than 1


@pytest.mark.parametrize("position_embedding", ["2d", "1d"])
def test_save_load_round_trip(tmp_path, position_embedding):
    model = tiny_transformer(num_classes=3, condition=True, position_embedding=position_embedding)
    model.save_pretrained(tmp_path / "prior")
    loaded = Prior.from_pretrained(tmp_path / "prior")
    assert type(loaded) is TransformerPrior and loaded.config == model.config
    codes, condition = torch.randint(0, 11, (2, *GRID)), random_condition(2)
    assert torch.equal(loaded.eval()(codes, 1, condition), model(codes, 1, condition))
    assert type(TransformerPrior.from_pretrained(tmp_path / "prior")) is TransformerPrior


def test_training_reaches_every_parameter():
    model = tiny_transformer(condition=True, depth=2, dropout=0.1, position_embedding="1d").train()
    codes = torch.randint(0, 11, (4, *GRID, 2))
    condition = random_condition(4)
    model.nll(codes, None, condition).backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None
               or parameter.grad.abs().max() == 0]
    assert missing == []
    # dropout acts in training only
    with torch.no_grad():
        assert not torch.equal(model(codes, None, condition), model(codes, None, condition))
        model.eval()
        assert torch.equal(model(codes, None, condition), model(codes, None, condition))


@pytest.mark.parametrize("config, message", [
    (dict(hidden_channels=10, num_heads=4), r"--num-heads 4 does not divide --hidden-channels 10; pick a head count"),
    (dict(position_embedding="1d", max_positions=20),
     r"raise --max-positions to at least 24 or use --position-embedding 2d"),
])
def test_bad_config(config, message):
    with pytest.raises(ValueError, match=message) as raised:
        PriorConfig(arch="transformer", latent_shape=GRID, **config)
    assert "\n" not in str(raised.value)


def test_refuses_another_arch():
    with pytest.raises(ValueError, match="build it with Prior.from_config"):
        TransformerPrior(PriorConfig(arch="gated"))
