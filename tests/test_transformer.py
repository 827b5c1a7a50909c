"""What is the transformer's own (the contract suite checks the rest): its 1-d position table, its KV cache at
trained scale, and its option errors."""
from __future__ import annotations

import pytest
import torch

from conftest import stepped_logit_error, stepped_logits
from stage2_prior import Prior, PriorConfig, TransformerPrior
from stage2_prior.decoding import Sampler, SamplingOptions, cast_copy

GRID = (4, 6)


def tiny_transformer(**config) -> TransformerPrior:
    torch.manual_seed(0)
    config = PriorConfig.build(arch="transformer", vocab_size=11, latent_shape=GRID, hidden_channels=8, num_heads=2,
                               num_layers=2, **config)
    model = Prior.from_config(config).double()
    for parameter in model.parameters():  # larger than default init, so every dependency shows in the logits
        parameter.data.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("position_embedding", ["2d", "1d"])
def test_kv_cache_reads_the_position_table_as_the_full_forward_does(position_embedding):
    # a 1-d table longer than the grid: the cache reads its first h*w entries; labels include the null class
    extra = dict(max_positions=40) if position_embedding == "1d" else {}
    model = tiny_transformer(num_classes=3, label_dropout=0.1, position_embedding=position_embedding, depth=2,
                             **extra)
    labels = torch.tensor([0, 2, model.config.null_class])
    codes = torch.randint(0, 11, (3, *GRID, 2))
    assert stepped_logit_error(model, "cached", codes, labels) < 1e-9
    assert model.position_table.shape[0] == 40 if extra else model.config.options.position_embedding == "2d"


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
    model = trained_scale_transformer()
    codes = model.stacked(model.sample(8, seed=1, precision="float32"))  # (8, 6, 6, 1)
    double = cast_copy(model, torch.float64)
    reference = double.stack_logits(codes, double.conditioning(double.context(None, None, 8)))  # (8, 6, 6, 1, V)
    assert reference.std() > 4
    seen, _ = stepped_logits(model, "cached", codes)  # float32
    errors = [(logits.double() - reference[:, row, column, depth]).abs().max().item()
              for (row, column, depth), logits in seen.items()]
    assert max(errors) < Sampler(model, SamplingOptions(precision="float32")).tolerance / 2
    cached = model.sample(8, seed=5)
    assert torch.equal(cached, model.sample(8, seed=5, method="naive"))
    assert torch.equal(cached, model.sample(8, seed=5, precision="float32"))


@pytest.mark.parametrize("config, message", [
    (dict(hidden_channels=10, num_heads=4), r"--num-heads 4 does not divide --hidden-channels 10; pick a head count"),
    (dict(position_embedding="1d", max_positions=20),
     r"raise --max-positions to at least 24 or use --position-embedding 2d"),
    (dict(attention_every=2), r"attention_every is an option of arch pixelsnail, not of transformer; pass "
                              r"arch='pixelsnail' or drop attention_every"),
])
def test_bad_config(config, message):
    with pytest.raises(ValueError, match=message) as raised:
        PriorConfig.build(arch="transformer", latent_shape=GRID, **config)
    assert "\n" not in str(raised.value)


def test_refuses_another_arch():
    with pytest.raises(ValueError, match="build it with Prior.from_config"):
        TransformerPrior(PriorConfig(arch="gated"))
