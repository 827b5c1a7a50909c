"""Autoregression inside a position: the PixelCNN++ head's distribution, pixel mode with the softmax and
mixture heads end to end, and residual quantization end to end (the contract suite checks every arch's
stacks: causality between entries, cached against naive)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipelines import Pipeline
from shared.codes import open_codes
from stage1_vqvae import PixelTokenizer, VQVAE, VQVAEConfig, load_tokenizer
from stage1_vqvae.export import export, main as export_main
from stage2_prior import Prior, PriorConfig
from stage2_prior.train import train as train_prior

PRIOR = ["--hidden-channels", "12", "--num-layers", "3", "--batch-size", "16", "--warmup-steps", "2", "--max-steps",
         "8", "--eval-every", "4", "--save-every", "8", "--sample-every", "8", "--no-progress"]


def tiny(arch: str, depth: int = 3, head: str = "softmax", vocab: int = 16, seed: int = 0,
         latent_shape: tuple[int, int] = (4, 5), **extra) -> Prior:
    torch.manual_seed(seed)
    model = Prior.from_config(PriorConfig(vocab_size=vocab, latent_shape=latent_shape, depth=depth, hidden_channels=24,
                                          num_layers=3, arch=arch, head=head, mixtures=2, dropout=0.0, **extra)).eval()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.4)
    return model


def test_mixture_head_is_a_normalised_distribution():
    """The per-entry categoricals multiply to the mixture's joint, which sums to 1 over all stacks."""
    model = tiny("gated", depth=3, head="logistic_mixture", vocab=4, latent_shape=(1, 1))  # every stack enumerable
    stacks = torch.tensor(list(itertools.product(range(4), repeat=3))).view(64, 1, 1, 3)  # all 4^3 pixels
    with torch.no_grad():
        total = torch.logsumexp(model.log_prob(stacks), dim=0)
        nll = model.nll(stacks)
        logits = model(stacks)
        chain = torch.nn.functional.cross_entropy(logits, stacks)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert nll.item() == pytest.approx(chain.item(), abs=1e-5)  # direct mixture NLL == the chain rule's


def test_validation_scores_the_mixture_by_its_own_likelihood():
    """prior_metrics skips the per-level table for the mixture head; its bits agree with the chain rule's."""
    from stage2_prior.train import prior_metrics

    model = tiny("gated", depth=3, head="logistic_mixture", vocab=16, latent_shape=(3, 3))
    grids = torch.randint(0, 16, (5, 3, 3, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)

    class Rows:  # the part of CodesDataset that prior_metrics reads
        def __len__(self):
            return len(grids)

        def __getitem__(self, index):
            return grids[index], torch.zeros(len(index), dtype=torch.long)

        def parts(self, item):  # (codes, labels, condition map, caption ids)
            return (*item, None, None)

    metrics = prior_metrics(model, Rows(), conditional=False, device=torch.device("cpu"))
    with torch.no_grad():
        chain = torch.nn.functional.cross_entropy(model(grids), grids.long()).item() / math.log(2)
    assert metrics["bits_per_code"] == pytest.approx(chain, rel=1e-5)
    assert "top1_accuracy" not in metrics


def test_pixel_tokenizer_round_trip_and_levels():
    for levels in (2, 4, 16, 256):
        tokenizer = PixelTokenizer(levels=levels, channels=3, image_size=8)
        codes = tokenizer.encode(torch.rand(2, 3, 8, 8) * 2 - 1)
        assert codes.shape == (2, 8, 8, 3) and int(codes.max()) < levels
        assert torch.equal(tokenizer.encode(tokenizer.decode(codes)), codes)
    grey = PixelTokenizer(levels=256, channels=1, image_size=8)
    images = torch.randint(0, 256, (2, 1, 8, 8)).float() / 127.5 - 1
    assert grey.encode(images).shape == (2, 8, 8) and torch.allclose(grey.decode(grey.encode(images)), images, atol=1e-6)
    with pytest.raises(ValueError, match="pixel levels must be one of 2, 4, 16, 256"):
        PixelTokenizer(levels=3)
    with pytest.raises(ValueError, match="logistic mixture head models pixel levels 4, 16 or 256"):
        PriorConfig(vocab_size=2, head="logistic_mixture")


@pytest.fixture(scope="module")
def rgb_pixels(tmp_path_factory):
    """48 solid-colour 8x8 RGB images in two classes: every pixel repeats its neighbours, easy to learn."""
    from PIL import Image
    import numpy as np

    root = tmp_path_factory.mktemp("rgb")
    folder = root / "photos"
    rng = np.random.default_rng(0)
    for index in range(48):
        (folder / "ab"[index % 2]).mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3, dtype=np.uint8)
        Image.fromarray(np.broadcast_to(colour, (8, 8, 3)).copy()).save(folder / "ab"[index % 2] / f"{index}.png")
    export(["--tokenizer", "pixels:16", "--dataset", str(folder), "--image-size", "8", "--output",
            str(root / "codes"), "--no-progress"])
    return root


def test_pixel_mode_end_to_end_with_the_mixture_head(rgb_pixels, tmp_path):
    codes, metadata = open_codes(rgb_pixels / "codes")
    assert metadata.tokenizer_class == "PixelTokenizer" and metadata.level().grid_shape == (8, 8, 3)
    assert codes[:2][0].shape == (2, 8, 8, 3)
    metrics = train_prior(["--codes", str(rgb_pixels / "codes"), "--output-dir", str(tmp_path / "prior"),
                           "--head", "logistic_mixture", "--mixtures", "3", "--learning-rate", "0.003",
                           "--no-keep-best", *PRIOR, "--max-steps", "40", "--eval-every", "40", "--save-every", "40"])
    prior = Prior.from_pretrained(tmp_path / "prior")
    from stage2_prior.train import prior_metrics

    assert metrics["bits_per_dim"] == metrics["bits_per_code"]
    # the mixture head learns: on the rows it trained on, far below the untrained model (48 solid colours are
    # too few to generalise to new colour combinations, which the held-out rows need)
    torch.manual_seed(0)
    rows = codes.level_view(None)
    before = prior_metrics(Prior.from_config(prior.config), rows, True, torch.device("cpu"))["bits_per_code"]
    assert prior_metrics(prior, rows, True, torch.device("cpu"))["bits_per_code"] < before - 0.5
    assert prior.config.depth == 3 and prior.config.head == "logistic_mixture"
    tokenizer = load_tokenizer("pixels:16", channels=3, image_size=8)
    pipeline = Pipeline(tokenizer, prior)
    out = pipeline.generate(3, seed=0, output_type="pt", progress=False)
    assert out.images.shape == (3, 3, 8, 8) and out.codes.shape == (3, 8, 8, 3)
    assert torch.equal(pipeline.generate(3, seed=0, batch_size=2, output_type="pt", progress=False).images, out.images)
    # completion in pixel mode keeps the known pixels exactly
    images = out.images * 2 - 1
    known = torch.zeros(3, 8, 8, dtype=torch.bool)
    known[:, :4] = True
    completed = pipeline.complete(images, known, seed=1)
    assert torch.equal(completed.codes[:, :4], out.codes[:, :4])


def test_pixel_mode_bad_input(rgb_pixels, tmp_path, capsys):
    grey = PixelTokenizer(levels=16, channels=1, image_size=8)
    grey.save_pretrained(tmp_path / "grey_pixels")
    folder = rgb_pixels / "photos"
    for tokenizer, message in [(str(tmp_path / "grey_pixels"), "this tokenizer takes 1-channel images"),
                               ("pixels:3", "pixel levels must be one of 2, 4, 16, 256"),
                               ("pixels:x", "write pixels:K")]:
        assert export_main(["--tokenizer", tokenizer, "--dataset", str(folder), "--image-size", "8", "--output",
                            str(tmp_path / "codes"), "--no-progress"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "codes").exists()
    # a prior whose stack depth disagrees with the tokenizer's
    prior = Prior.from_config(PriorConfig(vocab_size=16, latent_shape=(8, 8), depth=2, hidden_channels=4, num_layers=1))
    with pytest.raises(ValueError, match=r"latent_shape \(8, 8, 2\) differs from the tokenizer's \(8, 8, 3\)"):
        Pipeline(load_tokenizer("pixels:16", channels=3, image_size=8), prior)


def test_residual_quantization_end_to_end(tmp_path):
    from stage1_vqvae.train import train

    flags = ["--image-size", "16", "--hidden-channels", "16", "--latent-channels", "8", "--num-res-blocks", "1",
             "--codebook-size", "16", "--batch-size", "32", "--warmup-steps", "2", "--no-progress"]
    metrics = train(["--output-dir", str(tmp_path / "rvq"), "--quantizer", "rvq", "--num-quantizers", "3",
                     "--max-steps", "30", "--eval-every", "30", "--save-every", "30", *flags])
    assert 0 < metrics["codebook_usage"] <= 100
    tokenizer = VQVAE.from_pretrained(tmp_path / "rvq")
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    codes = tokenizer.encode(images)
    assert codes.shape == (2, 4, 4, 3)
    # decode sums the depths: the decoder reads the sum of all three depths' vectors, and dropping the last
    # depth's contribution changes the image
    vectors = tokenizer.quantizer.get_codes_from_indices(codes.flatten(1, 2))  # (Q, B, N, d)
    assert vectors.shape[0] == 3

    def decoded(summed: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> images, as decode() does it
        latents = tokenizer.quantizer.project_out(summed).transpose(1, 2).reshape(2, -1, 4, 4)
        return tokenizer.decoder(latents).clamp(-1, 1)

    with torch.no_grad():
        assert torch.allclose(decoded(vectors.sum(0)), tokenizer.decode(codes), atol=1e-5)
        assert (decoded(vectors[:2].sum(0)) - tokenizer.decode(codes)).abs().max() > 1e-3
    export(["--tokenizer", str(tmp_path / "rvq"), "--output", str(tmp_path / "codes"), "--no-progress"])
    assert open_codes(tmp_path / "codes")[1].level().grid_shape == (4, 4, 3)
    train_prior(["--codes", str(tmp_path / "codes"), "--output-dir", str(tmp_path / "prior"), *PRIOR])
    pipeline = Pipeline(tokenizer, Prior.from_pretrained(tmp_path / "prior"))
    out = pipeline.generate(2, labels=1, seed=0, output_type="pt", progress=False)
    assert out.codes.shape == (2, 4, 4, 3) and out.images.shape == (2, 1, 16, 16)


def test_residual_quantization_of_depth_one_is_one_code_per_position(tmp_path):

    torch.manual_seed(0)
    tokenizer = VQVAE(VQVAEConfig(image_size=16, hidden_channels=16, latent_channels=8, num_res_blocks=1,
                                  codebook_size=16, quantizer="rvq", num_quantizers=1))
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    tokenizer.train()(images)  # initialise the codebook
    codes = tokenizer.eval().encode(images)
    assert codes.shape == (2, 4, 4) and tokenizer.level_shapes == {"codes": (4, 4)}
    with torch.no_grad():
        assert torch.allclose(tokenizer.decode(codes), tokenizer(images).reconstruction, atol=1e-5)
    tokenizer.save_pretrained(tmp_path / "rvq1")
    export(["--tokenizer", str(tmp_path / "rvq1"), "--output", str(tmp_path / "codes"), "--dataset", "digits",
            "--image-size", "16", "--no-progress"])  # the stack of one once failed to write
    assert open_codes(tmp_path / "codes")[1].level().grid_shape == (4, 4)


def test_mixture_log_prob_is_the_training_loss_in_float64():
    """One helper makes the bin centres in the parameters' dtype: a float64 mixture prior's log_prob and its
    training loss describe the same likelihood (float32 centres once put them 4e-5 nats apart)."""
    model = tiny("gated", depth=3, head="logistic_mixture", vocab=256, latent_shape=(3, 3)).double()
    grids = torch.randint(0, 256, (4, 3, 3, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        total = -model.log_prob(grids).sum()
        loss = model.nll(grids) * grids.numel()  # the mean per code
        chain = -torch.log_softmax(model(grids), dim=1).gather(1, grids[:, None]).sum()  # the per-level table
    assert total.item() == pytest.approx(loss.item(), abs=1e-9) and total.item() == pytest.approx(chain.item(), abs=1e-9)
