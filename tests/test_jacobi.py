"""Exact parallel decoding (method "jacobi"): the sequential sample as a fixed point, reached in few passes.

The contract suite checks that every arch's Jacobi codes equal the sequential ones at small scale, with
filters, guidance, code maps, stacks and complete(); here: trained scale in float32 and float64 (where the
guard re-decides draws inside the iteration), the pass counts, the pipeline and the command, and the guard
rail that stops a network that sees later codes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tree_digest
from stage2_prior import Prior, PriorConfig
from stage2_prior.testing import trained_scale_prior


@pytest.fixture(scope="module")
def prior6() -> Prior:
    return trained_scale_prior(6, num_layers=4)


@pytest.mark.parametrize("precision, options", [
    ("float32", dict()), pytest.param("float32", dict(top_p=0.9), marks=pytest.mark.slow, id="float32 top_p"),
    pytest.param("float32", dict(temperature=0.8, top_k=40), marks=pytest.mark.slow, id="float32 temperature+top_k"),
    ("float64", dict()), ("float64", dict(strategy="greedy"))], ids=["float32", None, None, "float64", "float64 greedy"])
def test_jacobi_draws_the_sequential_codes_at_trained_scale(prior6, precision, options):
    cached, sequential = prior6.sample(12, seed=5, sample_offset=109, precision=precision, return_stats=True, **options)
    codes, stats = prior6.sample(12, seed=5, sample_offset=109, precision=precision, method="jacobi",
                                 return_stats=True, **options)
    assert torch.equal(codes, cached)
    assert torch.equal(prior6.sample(3, seed=5, sample_offset=112, precision=precision, method="jacobi", **options),
                       cached[3:6])  # a sample does not depend on its batch
    assert (sequential.sequential_passes == 36).all()  # the cached sampler: one pass per position
    assert (stats.sequential_passes >= 1).all() and (stats.sequential_passes <= 36).all()
    if precision == "float32" and not options.get("strategy"):
        assert stats.recomputed > 0  # the guard did re-decide draws inside the iteration


@pytest.mark.parametrize("depth", [1, 3])
def test_windowed_jacobi_at_trained_scale(depth):
    prior = trained_scale_prior(6, arch="transformer", num_layers=4, depth=depth)
    cached, sequential = prior.sample(8, seed=2, precision="float32", top_p=0.9, return_stats=True)
    for window in (1, 4, 36):
        codes, stats = prior.sample(8, seed=2, precision="float32", top_p=0.9, method="jacobi", window=window,
                                    return_stats=True)
        assert torch.equal(codes, cached), window
        assert stats.recomputed > 0  # the guard re-decided draws inside the windows
        if window == 1:  # one position a pass, its stack decided by the head in turn: the sequential sampler
            assert (stats.sequential_passes == 36).all()
        assert (stats.sequential_passes <= 36).all()  # a pass settles at least one whole position


def test_a_pass_settles_whole_positions_when_the_head_orders_the_stack():
    """The transformer's features do not read a position's own stack, so one pass decides the stack entry by
    entry with the head: at most one pass per position, not per draw."""
    prior = trained_scale_prior(4, arch="transformer", num_layers=2, depth=3)
    codes, stats = prior.sample(8, seed=1, method="jacobi", return_stats=True)
    assert torch.equal(codes, prior.sample(8, seed=1))
    assert (stats.sequential_passes <= 16).all()


def test_a_prior_that_ignores_the_past_settles_in_two_passes():
    """Logits that do not depend on earlier codes: the first pass draws every code, the second changes
    nothing, and the sample stops there (the cached sampler needs one pass per position, 20)."""
    prior = Prior.from_config(PriorConfig(vocab_size=7, latent_shape=(4, 5), hidden_channels=8, num_layers=2))
    with torch.no_grad():
        prior.head.out.weight.zero_()
        prior.head.out.bias.copy_(torch.randn(7))
    codes, stats = prior.sample(6, seed=2, method="jacobi", return_stats=True)
    assert torch.equal(codes, prior.sample(6, seed=2)) and (stats.sequential_passes == 2).all()


def test_a_settled_draw_that_changes_is_an_internal_error(monkeypatch):
    """A network that reads a later code would change draws that had settled; the guarded precisions
    (float64, float32) stop with the draw and the sample instead of returning a point that is not the
    sequential sample. Here every decision is shifted at random, as such a network's would be."""
    import stage2_prior.decoding.jacobi as jacobi

    model = Prior.from_config(PriorConfig(vocab_size=5, latent_shape=(2, 3), hidden_channels=8, num_layers=2))
    original = jacobi.decide_all

    def shifted(*args):
        codes, flags = original(*args)
        return (codes + torch.randint(1, 5, codes.shape)) % 5, torch.zeros_like(flags)

    monkeypatch.setattr(jacobi, "decide_all", shifted)
    with pytest.raises(RuntimeError, match=r"jacobi decoding: draw \d+ of sample \d+ had settled and changed in a "
                                           r"later pass: the network reads a later code"):
        model.sample(2, seed=0, method="jacobi")


@pytest.mark.parametrize("call, message", [
    (lambda p: p.sample(1, method="jacobi", window=0), "window must be an integer of at least 1"),
    (lambda p: p.sample(1, method="cached", window=4), "a window is a setting of method='jacobi'"),
    (lambda p: p.sample(1, window=4), "a window is a setting of method='jacobi' .*not of the default method"),
    (lambda p: p.sample(1, method="jacobi", window=4), "arch 'gated' has no windowed step"),
    (lambda p: p.beam_search(1, num_beams=2, method="jacobi"), "beam search keeps partial grids in raster order"),
])
def test_bad_jacobi_options(call, message):
    prior = Prior.from_config(PriorConfig(vocab_size=5, latent_shape=(2, 3), hidden_channels=8, num_layers=2))
    with pytest.raises(ValueError, match=message):
        call(prior)


def test_the_pipeline_and_the_command_decode_every_level_with_jacobi(tmp_path, capsys):
    from pipelines import Pipeline
    from pipelines.generate import main as generate_main
    from stage1_vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    tokenizer = VQVAE(VQVAEConfig(image_size=16, hidden_channels=8, latent_channels=4, num_res_blocks=1,
                                  codebook_size=16, levels=2)).eval()
    top = Prior.from_config(PriorConfig(arch="transformer", vocab_size=16, latent_shape=(2, 2), num_classes=3,
                                        hidden_channels=8, num_layers=2, options=dict(num_heads=2), level="top"))
    bottom = Prior.from_config(PriorConfig(vocab_size=16, latent_shape=(4, 4), num_classes=3, hidden_channels=8,
                                           num_layers=2, condition_vocab_size=16, condition_shape=(2, 2),
                                           level="bottom", condition_level="top"))
    pipeline = Pipeline(tokenizer, [top, bottom])
    cached = pipeline.generate(5, labels=1, seed=4, output_type="pt", progress=False)
    parallel = pipeline.generate(5, labels=1, seed=4, output_type="pt", progress=False, method="jacobi")
    assert all(torch.equal(cached.codes[level], parallel.codes[level]) for level in ("top", "bottom"))
    assert torch.equal(cached.images, parallel.images)
    with pytest.raises(ValueError, match="arch 'gated' has no windowed step"):  # the bottom prior has none
        pipeline.generate(2, labels=1, method="jacobi", window=2, progress=False)
    pipeline.save_pretrained(tmp_path / "pipe")
    common = ["--pipeline", str(tmp_path / "pipe"), "--num-images", "3", "--labels", "1", "--seed", "4", "--no-progress"]
    assert generate_main([*common, "--output-dir", str(tmp_path / "cached")]) == 0
    assert generate_main([*common, "--output-dir", str(tmp_path / "jacobi"), "--method", "jacobi"]) == 0
    for level in ("top", "bottom"):
        assert np.array_equal(np.load(tmp_path / "cached" / f"codes_{level}.npy"),
                              np.load(tmp_path / "jacobi" / f"codes_{level}.npy"))
    before = tree_digest(tmp_path)
    capsys.readouterr()
    for extra, message in [(["--method", "jacobi", "--num-beams", "2"], "beam search keeps partial grids"),
                           (["--window", "2"], "a window is a setting of method='jacobi'"),
                           (["--method", "jacobi", "--window", "0"], "window must be an integer of at least 1")]:
        assert generate_main([*common, "--output-dir", str(tmp_path / "jacobi"), "--overwrite", *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert tree_digest(tmp_path) == before
