"""The families beyond raster order on one design: VAR (a multi-scale tokenizer and next-scale prediction)
and MaskGIT (masked decoding in rounds), from the commands to the pipeline; guidance schedules; bad input."""
from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import torch

from conftest import TINY_TOKENIZER_FLAGS, tree_digest
from pipelines import Pipeline
from pipelines.generate import main as generate_main
from pipelines.parts import known_cells
from shared.codes import open_codes
from stage1_vqvae import load_tokenizer
from stage1_vqvae.export import export
from stage1_vqvae.train import main as tokenizer_main, train
from stage2_prior import Prior, PriorConfig
from stage2_prior.decoding.options import GuidanceSchedule
from stage2_prior.train import main as prior_main, train as train_prior

PRIOR = ["--hidden-channels", "16", "--num-layers", "2", "--num-heads", "2", "--batch-size", "32", "--warmup-steps",
         "2", "--max-steps", "6", "--eval-every", "3", "--save-every", "6", "--sample-every", "6", "--label-dropout",
         "0.1", "--no-progress"]


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A multi-scale tokenizer on 16x16 digits (scales 1 2 4 of a 4x4 latent), its export and a VAR prior."""
    root = tmp_path_factory.mktemp("var")
    train(["--output-dir", str(root / "tokenizer"), "--quantizer", "multiscale", "--scales", "1", "2", "4",
           "--max-steps", "30", "--eval-every", "30", "--save-every", "30", *TINY_TOKENIZER_FLAGS])
    export(["--tokenizer", str(root / "tokenizer"), "--output", str(root / "codes"), "--no-progress"])
    train_prior(["--codes", str(root / "codes"), "--arch", "var", "--output-dir", str(root / "var"), *PRIOR])
    return root


@pytest.fixture(scope="module")
def grid_codes(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("maskgit")
    export(["--tokenizer", str(tiny_tokenizer), "--output", str(root / "codes"), "--no-progress"])
    train_prior(["--codes", str(root / "codes"), "--arch", "maskgit", "--output-dir", str(root / "maskgit"), *PRIOR])
    return root


def test_the_pyramid_export_has_one_level_per_scale_and_the_var_prior_reads_them_joined(pyramid):
    codes, metadata = open_codes(pyramid / "codes")
    assert metadata.scales == (1, 2, 4) and metadata.level_names == ["scale_1", "scale_2", "scale_4"]
    assert json.loads((pyramid / "codes" / "codes.json").read_text())["scales"] == [1, 2, 4]
    joined = codes.pyramid_view()[:3][0]  # (3, 21): every scale in raster order, coarse to fine
    expected = torch.cat([codes.level_view(name)[:3][0].flatten(1) for name in metadata.level_names], 1)
    assert joined.shape == (3, 21) and torch.equal(joined, expected)
    prior = Prior.from_pretrained(pyramid / "var")
    assert prior.config.scales == (1, 2, 4) and prior.config.latent_shape == (1, 21)
    assert prior.level_names == ("scale_1", "scale_2", "scale_4")
    assert "bits_per_code" in json.loads((pyramid / "var" / "metrics.json").read_text())


def test_var_samples_one_pass_per_scale_and_the_pipeline_decodes_the_pyramid(pyramid, tmp_path):
    prior = Prior.from_pretrained(pyramid / "var")
    codes, stats = prior.sample(5, labels=3, seed=1, return_stats=True)
    assert codes.shape == (5, 21) and stats.sequential_passes.tolist() == [3] * 5  # three scales, three passes
    assert torch.equal(prior.sample(5, labels=3, seed=1, method="naive"), codes)
    jacobi, jacobi_stats = prior.sample(5, labels=3, seed=1, method="jacobi", return_stats=True)
    assert torch.equal(jacobi, codes) and int(jacobi_stats.sequential_passes.max()) <= 4
    pipeline = Pipeline(load_tokenizer(pyramid / "tokenizer"), prior)
    out = pipeline.generate(5, labels=3, seed=1, output_type="pt", progress=False)
    assert out.images.shape == (5, 1, 16, 16) and list(out.codes) == ["scale_1", "scale_2", "scale_4"]
    assert torch.equal(prior.join_levels(out.codes), codes)
    pipeline.save_pretrained(tmp_path / "pipeline")
    assert generate_main(["--pipeline", str(tmp_path / "pipeline"), "--num-images", "3", "--output-dir",
                          str(tmp_path / "out"), "--labels", "3", "--guidance-scale", "2", "--guidance-schedule",
                          "linear", "--no-progress"]) == 0
    assert np.load(tmp_path / "out" / "codes_scale_4.npy").shape == (3, 4, 4)


def test_var_log_prob_is_a_normalised_distribution_over_pyramids():
    torch.manual_seed(2)
    prior = Prior.from_config(PriorConfig.build(arch="var", vocab_size=3, scales=(1, 2), latent_shape=(1, 5),
                                                hidden_channels=8, num_layers=2, num_heads=2)).eval()
    for parameter in prior.parameters():
        parameter.data.normal_(0, 0.7)
    pyramids = torch.tensor(list(itertools.product(range(3), repeat=5)))  # all 243 pyramids of scales 1 and 2
    log_probs = prior.log_prob(pyramids)
    assert log_probs.logsumexp(0).item() == pytest.approx(0.0, abs=1e-9)
    # a scale's tokens are independent given the scales before: the pyramid's log-probability factorises
    logits = torch.log_softmax(prior(pyramids).double(), dim=1)  # (243, 3, 5)
    assert torch.allclose(log_probs, logits.gather(1, pyramids[:, None]).squeeze(1).sum(1))


def test_maskgit_trains_on_the_raster_codes_and_generates_in_rounds(grid_codes, tiny_tokenizer, tmp_path):
    metrics = json.loads((grid_codes / "maskgit" / "metrics.json").read_text())
    assert "masked_bits_per_code" in metrics and "bits_per_code" not in metrics
    prior = Prior.from_pretrained(grid_codes / "maskgit")
    # the validation mask of a row is its own: the same in any batch (so on any number of processes)
    codes = torch.randint(0, prior.config.vocab_size, (6, 4, 4))
    labels = torch.arange(6) % 4
    _, whole = prior.validation_scores(codes, labels, None, torch.arange(6))
    _, part = prior.validation_scores(codes[4:], labels[4:], None, torch.arange(4, 6))
    assert torch.equal(whole[4:], part) and not torch.equal(whole[4], whole[5])
    pipeline = Pipeline(load_tokenizer(tiny_tokenizer), prior)
    out = pipeline.generate(4, labels=[0, 1, 2, 3], seed=2, steps=3, output_type="pt", progress=False)
    assert out.codes.shape == (4, 4, 4)
    again = pipeline.generate(4, labels=[0, 1, 2, 3], seed=2, steps=3, batch_size=1, output_type="pt", progress=False)
    assert torch.equal(again.codes, out.codes) and torch.equal(again.images, out.images)
    images = out.images.mul(2).sub(1)
    known = torch.zeros(4, 16, 16, dtype=torch.bool)
    known[:, :8] = True  # the top half: outpainting the bottom
    completed = pipeline.complete(images, known, labels=[0, 1, 2, 3], seed=5, steps=2)
    assert torch.equal(completed.codes[:, :2], pipeline.encode(images).cpu()[:, :2])  # the known rows stay


@pytest.mark.parametrize("flags, message", [
    (lambda root: ["--codes", str(root["grid"] / "codes"), "--arch", "var"],
     "not a multi-scale pyramid: a pyramid arch \\(var\\) needs codes of a --quantizer multiscale tokenizer"),
    (lambda root: ["--codes", str(root["pyramid"] / "codes")],
     "multi-scale pyramid \\(scales 1 2 4\\) and arch gated models one grid: use --arch var"),
    (lambda root: ["--codes", str(root["pyramid"] / "codes"), "--arch", "maskgit"], "arch maskgit models one grid"),
    (lambda root: ["--codes", str(root["pyramid"] / "codes"), "--arch", "var", "--level", "scale_2"],
     "drop --level"),
])
def test_a_prior_on_codes_it_does_not_model_is_refused(pyramid, grid_codes, tmp_path, capsys, flags, message):
    before = tree_digest(tmp_path)
    assert prior_main([*flags({"pyramid": pyramid, "grid": grid_codes}), "--output-dir", str(tmp_path / "run"),
                       "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert tree_digest(tmp_path) == before


def test_a_pipeline_refuses_a_pyramid_prior_with_a_grid_tokenizer(pyramid, tiny_tokenizer):
    with pytest.raises(ValueError, match="a pyramid's pipeline is its tokenizer with one prior"):
        Pipeline(load_tokenizer(tiny_tokenizer), Prior.from_pretrained(pyramid / "var"), check_provenance=False)


@pytest.mark.parametrize("text, factors", [
    ("constant", [1, 1, 1, 1, 1]), ("linear", [0, 0.25, 0.5, 0.75, 1]), ("power:2", [0, 0.0625, 0.25, 0.5625, 1]),
    ("interval:0.2:0.6", [0, 1, 1, 0, 0]),
])
def test_guidance_schedules(text, factors):
    assert GuidanceSchedule.parse(text).factors(5).tolist() == pytest.approx(factors)


@pytest.mark.parametrize("text", ["ramp", "power:0", "power:x", "interval:0.8:0.2", "linear:2"])
def test_a_bad_guidance_schedule_is_one_line(text):
    with pytest.raises(ValueError, match="guidance_schedule must be one of constant, linear, power:P, interval:A:B"):
        GuidanceSchedule.parse(text)


def test_a_scheduled_scale_changes_the_draws_where_it_differs_and_only_there():
    """Guidance on the interval [0, 0.5] of the raster positions: the first half of a grid is drawn as under
    constant guidance; given that half, the rest is drawn as without guidance."""
    torch.manual_seed(0)
    prior = Prior.from_config(PriorConfig(vocab_size=16, latent_shape=(2, 4), num_classes=2, label_dropout=0.1,
                                          hidden_channels=16, num_layers=2)).eval()
    for parameter in prior.parameters():
        parameter.data.normal_(0, 0.5)
    constant = prior.sample(64, labels=1, seed=0, guidance_scale=3.0)
    interval = prior.sample(64, labels=1, seed=0, guidance_scale=3.0, guidance_schedule="interval:0:0.5")
    assert torch.equal(interval[:, 0], constant[:, 0])  # row 0: positions 0-3, progress up to 3/7
    known = torch.zeros_like(constant, dtype=torch.bool)
    known[:, 0] = True
    completed = {name: prior.complete(constant, known, labels=1, seed=1, **options) for name, options in {
        "interval": dict(guidance_scale=3.0, guidance_schedule="interval:0:0.5"), "unguided": dict(),
        "constant": dict(guidance_scale=3.0)}.items()}
    assert torch.equal(completed["interval"], completed["unguided"])  # row 1: progress from 4/7, no guidance
    assert not torch.equal(completed["constant"], completed["unguided"])


def test_bad_scales_and_steps_on_the_command_line_are_one_line_errors(grid_codes, tiny_tokenizer, tmp_path, capsys):
    before = tree_digest(tmp_path)
    assert tokenizer_main(["--output-dir", str(tmp_path / "tok"), "--quantizer", "multiscale", "--scales", "1", "3",
                           "2", "8", "--no-progress"]) == 2
    assert "--scales 1 3 2 8 must be increasing" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before  # nothing written
    pipeline = Pipeline(load_tokenizer(tiny_tokenizer), Prior.from_pretrained(grid_codes / "maskgit"))
    pipeline.save_pretrained(tmp_path / "pipeline")
    before = tree_digest(tmp_path)
    for flags, message in ((["--steps", "0"], "steps must be an integer of at least 1"),
                           (["--steps", "17"], "steps 17 is more rounds than the 16 positions"),
                           (["--num-beams", "2"], "is a masked prior: beam search extends grids in an order"),
                           (["--guidance-schedule", "linear"], "a guidance schedule needs --guidance-scale")):
        assert generate_main(["--pipeline", str(tmp_path / "pipeline"), "--num-images", "2", "--output-dir",
                              str(tmp_path / "out"), *flags, "--no-progress"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert tree_digest(tmp_path) == before


def test_complete_keeps_no_cell_that_saw_an_unknown_pixel_at_any_scale():
    """A scale whose side does not divide the image's (3 and 6 of 32 pixels): its edge cells still see the
    edge pixels, so unknown bottom rows make the bottom row of cells unknown at every scale."""
    known = torch.ones(2, 32, 32, dtype=torch.bool)
    known[:, 30:] = False  # the bottom two pixel rows
    for side in (1, 2, 3, 4, 6, 8):
        cells = known_cells(known, (side, side))
        assert cells.shape == (2, side, side) and not cells[:, -1].any(), side
        assert side < 3 or cells[:, :-1].all(), side  # the rows above saw only known pixels
    assert known_cells(torch.ones(1, 32, 32, dtype=torch.bool), (3, 3)).all()
