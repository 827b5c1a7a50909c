"""pipelines/: the Pipeline object, the generate command (1 and 2 processes), the quickstart."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_module, run_torchrun, tree_digest
from pipelines import Pipeline
from stage1_vqvae import VQVAE, VQVAEConfig
from stage2_prior import GatedPixelCNN, PriorConfig


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tokenizer = VQVAE(VQVAEConfig(image_size=16, hidden_channels=8, latent_channels=8, num_res_blocks=1,
                                  codebook_size=16))
    tokenizer(torch.rand(8, 1, 16, 16) * 2 - 1)  # k-means init of the codebook
    prior = GatedPixelCNN(PriorConfig(vocab_size=16, latent_shape=(4, 4), num_classes=3, hidden_channels=8,
                                      num_layers=3))
    return tokenizer.eval(), prior.eval()


@pytest.fixture(scope="module")
def pipeline_dir(parts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pipe") / "pipeline"
    Pipeline(*parts).save_pretrained(directory)
    return directory


def test_mismatch_raises(parts):
    tokenizer, _ = parts
    other_vocab = GatedPixelCNN(PriorConfig(vocab_size=17, latent_shape=(4, 4), hidden_channels=4, num_layers=1))
    with pytest.raises(ValueError, match="vocab_size 17 differs from the tokenizer's codebook_size 16"):
        Pipeline(tokenizer, other_vocab)
    other_shape = GatedPixelCNN(PriorConfig(vocab_size=16, latent_shape=(5, 4), hidden_channels=4, num_layers=1))
    with pytest.raises(ValueError, match=r"latent_shape \(5, 4\) differs from the tokenizer's \(4, 4\)"):
        Pipeline(tokenizer, other_shape)


def test_save_load_same_images(parts, pipeline_dir):
    loaded = Pipeline.from_pretrained(pipeline_dir, device="cpu")
    original = Pipeline(*parts)
    a = original.generate(5, labels=[0, 1, 2, 0, 1], seed=3, output_type="pt", progress=False)
    b = loaded.generate(5, labels=[0, 1, 2, 0, 1], seed=3, output_type="pt", progress=False)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.images, b.images)


def test_batch_size_independence_and_seed(pipeline_dir):
    pipe = Pipeline.from_pretrained(pipeline_dir, device="cpu")
    whole = pipe.generate(7, seed=11, output_type="pt", progress=False)  # conditional, labels drawn from the seed
    split = pipe.generate(7, seed=11, batch_size=3, output_type="pt", progress=False)
    assert torch.equal(whole.codes, split.codes) and torch.equal(whole.images, split.images)
    assert not torch.equal(pipe.generate(7, seed=12, output_type="pt", progress=False).codes, whole.codes)


def test_output_types(pipeline_dir):
    pipe = Pipeline.from_pretrained(pipeline_dir, device="cpu")
    tensor = pipe.generate(2, labels=1, seed=0, output_type="pt", progress=False).images
    assert tensor.shape == (2, 1, 16, 16) and tensor.dtype == torch.float32 and 0 <= tensor.min() <= tensor.max() <= 1
    array = pipe.generate(2, labels=1, seed=0, output_type="np", progress=False).images
    assert array.shape == (2, 16, 16, 1) and array.dtype == np.uint8
    assert np.array_equal(array, tensor.mul(255).round().byte().permute(0, 2, 3, 1).numpy())
    images = pipe.generate(2, labels=1, seed=0, progress=False).images
    assert all(isinstance(image, Image.Image) and image.size == (16, 16) for image in images)


def test_encode_decode_reconstruct_complete(pipeline_dir):
    pipe = Pipeline.from_pretrained(pipeline_dir, device="cpu")
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    codes = pipe.encode(images)
    assert codes.shape == (2, 4, 4)
    assert torch.equal(pipe.reconstruct(images), pipe.decode(codes))
    known = torch.zeros(2, 16, 16, dtype=torch.bool)
    known[:, :8] = True  # the top half of the pixels: the top two rows of cells
    known[:, 8:10, :3] = True  # part of a cell only: that cell is not kept
    completed = pipe.complete(images, known, labels=0, seed=4)
    assert torch.equal(completed.codes[:, :2], codes[:, :2])
    assert completed.images.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("call, message", [
    (lambda p: p.generate(0), "num_images must be an integer of at least 1"),
    (lambda p: p.generate(2, labels=5), r"labels must lie in \[0, 3\)"),
    (lambda p: p.generate(2, labels=[0, 1, 2]), "labels must be an int or 2 ints"),
    (lambda p: p.generate(2, output_type="jpeg"), "output_type must be one of"),
    (lambda p: p.encode(torch.zeros(1, 3, 16, 16)), r"images must be \(B, 1, 16, 16\)"),
    (lambda p: p.encode(torch.zeros(1, 1, 32, 32)), r"images must be \(B, 1, 16, 16\)"),
    (lambda p: p.complete(torch.zeros(1, 1, 16, 16), torch.ones(1, 8, 8, dtype=torch.bool)), "known_mask must be"),
])
def test_api_bad_input(pipeline_dir, call, message):
    with pytest.raises(ValueError, match=message):
        call(Pipeline.from_pretrained(pipeline_dir, device="cpu"))


def test_unconditional_prior_refuses_labels(parts):
    tokenizer, _ = parts
    prior = GatedPixelCNN(PriorConfig(vocab_size=16, latent_shape=(4, 4), hidden_channels=4, num_layers=1))
    with pytest.raises(ValueError, match="unconditional"):
        Pipeline(tokenizer, prior).generate(1, labels=0)


def test_incomplete_pipeline_folder(tmp_path, pipeline_dir):
    import shutil

    shutil.copytree(pipeline_dir, tmp_path / "broken")
    shutil.rmtree(tmp_path / "broken" / "prior")
    with pytest.raises(ValueError, match="incomplete: prior missing"):
        Pipeline.from_pretrained(tmp_path / "broken")
    with pytest.raises(ValueError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "absent")


def test_generate_command_single_and_two_processes(pipeline_dir, tmp_path):
    flags = ["--pipeline", str(pipeline_dir), "--num-images", "7", "--seed", "5", "--batch-size", "2", "--no-progress"]
    single = run_module("pipelines.generate", *flags, "--output-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-2000:]
    # two processes, each decoding its share with the parallel (Jacobi) method: the same files
    double = run_torchrun("pipelines.generate", *flags, "--method", "jacobi", "--output-dir", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = tree_digest(tmp_path / "one"), tree_digest(tmp_path / "two")
    assert sorted(one) == sorted(two) == sorted([f"image_{k:05d}.png" for k in range(7)] + ["grid.png", "codes.npy"])
    assert one == two
    assert np.load(tmp_path / "one" / "codes.npy").shape == (7, 4, 4)


def test_beam_search_through_the_pipeline_and_the_command(pipeline_dir, tmp_path):
    from pipelines.generate import generate

    pipe = Pipeline.from_pretrained(pipeline_dir, device="cpu")
    labels = torch.tensor([0, 1, 2])
    best = pipe.prior.beam_search(3, labels=labels, num_beams=3)
    beams = pipe.generate(3, labels=labels, num_beams=3, batch_size=2, output_type="pt", progress=False)
    assert torch.equal(beams.codes, best.codes)
    assert torch.allclose(beams.images, pipe.decode(best.codes).float().add(1).div(2).clamp(0, 1), atol=1e-5)
    assert best.log_prob.max() > pipe.prior.log_prob(pipe.generate(3, labels=labels, seed=0, progress=False).codes,
                                                     labels).max()
    generate(["--pipeline", str(pipeline_dir), "--output-dir", str(tmp_path / "beams"), "--num-images", "3",
              "--labels", "0", "1", "2", "--num-beams", "3", "--no-progress"])
    assert np.array_equal(np.load(tmp_path / "beams" / "codes.npy"), best.codes.numpy())


def test_quickstart_fast_end_to_end(tmp_path):
    from pipelines.quickstart import quickstart

    summary = quickstart(["--output-dir", str(tmp_path / "qs"), "--fast", "--no-progress"])
    for part in ("tokenizer", "codes", "prior", "pipeline", "samples.png", "reconstructions.png"):
        assert (tmp_path / "qs" / part).exists(), part
    pipe = Pipeline.from_pretrained(tmp_path / "qs" / "pipeline", device="cpu")
    assert pipe.prior.config.num_classes == 10
    # 10 rows (one per digit) of 10 samples, 16 px each with 2 px padding
    assert Image.open(tmp_path / "qs" / "samples.png").size == (10 * 18 + 2, 10 * 18 + 2)
    assert summary["prior"]["bits_per_code"] > 0 and summary["tokenizer"]["psnr_db"] > 0
