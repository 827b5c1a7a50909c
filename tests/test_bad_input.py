"""Every command and the public API against the bad inputs the issues name.

Each command case asserts exit code 2, one line `error: ...` that names the problem, no traceback,
and that no file that existed before has changed (the whole test folder and the shared fixtures
are hashed before and after). Each API case asserts a ValueError with the promised message.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import TINY_TOKENIZER_FLAGS, tree_digest, write_image_folder
from pipelines import Pipeline
from pipelines.evaluate import main as pipeline_evaluate_main
from pipelines.generate import main as generate_main
from stage1_vqvae import VQVAE, VQVAEConfig
from stage1_vqvae.evaluate import main as tokenizer_evaluate_main
from stage1_vqvae.export import export, main as export_main
from stage1_vqvae.train import main as tokenizer_main
from stage2_prior import GatedPixelCNN, Prior, PriorConfig
from stage2_prior.train import main as prior_main, train as train_prior

PRIOR_FLAGS = ["--hidden-channels", "8", "--num-layers", "2", "--batch-size", "16", "--no-progress"]


@dataclass
class Where:
    """The shared fixtures and this case's own folder."""

    tmp: Path
    tokenizer: Path
    codes: Path
    prior: Path
    pipeline: Path


@dataclass
class Case:
    command: Callable
    name: str
    argv: Callable[[Where], list[str]]
    message: str
    setup: Callable[[Where], None] = field(default=lambda where: None)


def broken_image_folder(where: Where, mode: str = "L") -> str:
    root = write_image_folder(where.tmp / "imgs", {"a": 3}, mode=mode)
    (root / "a" / "1.png").write_bytes(b"\x89PNG but not really")
    return str(root)


def edited_codes(where: Where, **changes) -> str:
    shutil.copytree(where.codes, where.tmp / "edited")
    meta = json.loads((where.tmp / "edited" / "codes.json").read_text())
    meta.update(changes)
    (where.tmp / "edited" / "codes.json").write_text(json.dumps(meta))
    return str(where.tmp / "edited")


def tok(where: Where, *extra: str, dataset: str = "digits", output: str | None = None) -> list[str]:
    return ["--dataset", dataset, "--output-dir", output or str(where.tmp / "out"), "--max-steps", "2",
            *TINY_TOKENIZER_FLAGS, *extra]


def exp(where: Where, *extra: str, tokenizer: str | None = None, dataset: str = "digits",
        output: str | None = None) -> list[str]:
    return ["--tokenizer", tokenizer or str(where.tokenizer), "--dataset", dataset,
            "--output", output or str(where.tmp / "codes"), "--no-progress", *extra]


def pri(where: Where, *extra: str, codes: str | None = None, output: str | None = None) -> list[str]:
    return ["--codes", codes or str(where.codes), "--output-dir", output or str(where.tmp / "prior"),
            "--max-steps", "2", *PRIOR_FLAGS, *extra]


def gen(where: Where, *extra: str, pipeline: str | None = None) -> list[str]:
    return ["--pipeline", pipeline or str(where.pipeline), "--output-dir", str(where.tmp / "images"),
            "--num-images", "2", "--no-progress", *extra]


def earlier_images(where: Where) -> None:
    """An output folder that an earlier generate run filled: a failed run must leave it as it was."""
    (where.tmp / "images").mkdir()
    (where.tmp / "images" / "image_00000.png").write_bytes(b"an earlier image")


def saved_dataset(where: Where) -> None:
    import datasets
    import numpy as np
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8), value, dtype=np.uint8)) for value in (0, 255)]
    datasets.Dataset.from_dict({"image": images, "name": ["dark", "light"]},
                               features=datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
                               ).save_to_disk(str(where.tmp / "saved"))


def mismatched_tokenizer(where: Where) -> None:
    VQVAE(VQVAEConfig(image_size=16, codebook_size=64)).save_pretrained(where.tmp / "other_tok")


def masked_pipeline(where: Where) -> None:
    """The shared tokenizer with a plain masked PixelCNN prior (no cached or compiled step)."""
    tokenizer = VQVAE.from_pretrained(where.tokenizer)
    trained = GatedPixelCNN.from_pretrained(where.prior)
    config = dataclasses.replace(trained.config, arch="pixelcnn", options=None)
    Pipeline(tokenizer, Prior.from_config(config)).save_pretrained(where.tmp / "masked")


def partial_pipeline(where: Where) -> None:
    shutil.copytree(where.pipeline, where.tmp / "partial")
    shutil.rmtree(where.tmp / "partial" / "tokenizer")


COMMAND_CASES = [
    # stage-1 training
    Case(tokenizer_main, "missing dataset folder", lambda w: tok(w, dataset=str(w.tmp / "nope")), "does not exist"),
    Case(tokenizer_main, "unknown hub name offline", lambda w: tok(w, dataset="no-such-user/no-such-set"),
         "cannot load dataset"),
    Case(tokenizer_main, "corrupt image with --strict-images", lambda w: tok(w, "--strict-images",
                                                                               dataset=broken_image_folder(w)),
         r"cannot read the image at row \d.*drop --strict-images"),
    Case(tokenizer_main, "empty dataset", lambda w: tok(w, dataset=str(w.tmp / "empty")), "holds no images",
         setup=lambda w: (w.tmp / "empty" / "a").mkdir(parents=True)),
    Case(tokenizer_main, "image size not divisible", lambda w: tok(w, "--image-size", "18"),
         "not divisible by the downsample factor 4"),
    Case(tokenizer_main, "channels mismatch", lambda w: tok(w, "--channels", "1", dataset=str(w.tmp / "rgb")),
         "has 3 channels, expected 1", setup=lambda w: write_image_folder(w.tmp / "rgb", {"a": 3}, mode="RGB")),
    Case(tokenizer_main, "output holds a trained model", lambda w: tok(w, output=str(w.tokenizer)),
         "already holds a trained model; pass --resume"),
    Case(tokenizer_main, "resume and overwrite", lambda w: tok(w, "--resume", "--overwrite"), "contradict"),
    Case(tokenizer_main, "resume with other settings", lambda w: tok(w, "--resume", "--learning-rate", "0.5",
                                                                      output=str(w.tokenizer)),
         "learning_rate=0.5, but the run"),
    Case(tokenizer_main, "unknown flag value", lambda w: tok(w, "--mixed-precision", "fp8"), "invalid choice"),
    Case(tokenizer_main, "lpips weights missing offline", lambda w: tok(w, "--perceptual-weight", "0.1"),
         r"alexnet-owt-.*hub/checkpoints.*--perceptual-weight 0"),
    Case(tokenizer_main, "label column of text", lambda w: tok(w, "--label-column", "name", dataset=str(w.tmp / "saved")),
         "does not hold integer class ids", setup=lambda w: saved_dataset(w)),
    Case(tokenizer_main, "image column without images", lambda w: tok(w, "--image-column", "name",
                                                                       dataset=str(w.tmp / "saved")),
         "does not hold images", setup=lambda w: saved_dataset(w)),
    Case(tokenizer_main, "column flags with digits", lambda w: tok(w, "--label-column", "kind"),
         "do not apply to --dataset digits"),
    Case(tokenizer_main, "negative workers", lambda w: tok(w, "--num-workers", "-1"), "--num-workers must be 0"),
    Case(tokenizer_main, "crop larger than the resized image", lambda w: tok(w, "--random-crop", "--crop-resize", "8"),
         "crop would be larger than the resized image"),
    Case(tokenizer_main, "crop resize without random crop", lambda w: tok(w, "--crop-resize", "20"),
         "applies only with --random-crop"),
    Case(tokenizer_main, "dataset config for a local folder", lambda w: tok(w, "--dataset-config", "x",
                                                                            dataset=str(w.tmp / "grey")),
         "--dataset-config applies to Hub datasets only",
         setup=lambda w: write_image_folder(w.tmp / "grey", {"a": 2}, mode="L")),
    Case(tokenizer_main, "label column that does not exist", lambda w: tok(w, "--label-column", "nope",
                                                                           dataset=str(w.tmp / "saved")),
         "has no column 'nope'.*--label-column none", setup=lambda w: saved_dataset(w)),
    Case(tokenizer_main, "batch that does not fit in memory",
         lambda w: ["--output-dir", str(w.tmp / "huge"), "--batch-size", "100000", "--no-progress"],
         "out of memory with --batch-size 100000.*lower --batch-size"),
    Case(tokenizer_main, "unknown quantizer", lambda w: tok(w, "--quantizer", "vqq"),
         "invalid choice: 'vqq' \\(choose from 'vq', 'fsq', 'simvq', 'lfq', 'rvq', 'multiscale'\\)"),
    Case(tokenizer_main, "keep-best by LPIPS without it", lambda w: tok(w, "--best-metric", "lpips"),
         "--best-metric lpips needs the LPIPS network: pass --perceptual-weight"),
    Case(tokenizer_main, "fsq levels disagree", lambda w: tok(w, "--quantizer", "fsq", "--codebook-size", "100"),
         "product of --fsq-levels"),
    Case(tokenizer_main, "discriminator starts after the last step",
         lambda w: tok(w, "--discriminator-weight", "0.1", "--discriminator-start", "2"),
         "--discriminator-start 2 is not below --max-steps 2.*pass a smaller --discriminator-start"),
    Case(tokenizer_main, "discriminator deeper than the images", lambda w: tok(w, "--discriminator-weight", "0.1"),
         "3-layer discriminator shrinks 16px images to nothing.*--discriminator-layers 2"),
    Case(tokenizer_main, "channel_mult disagrees with the downsampling",
         lambda w: tok(w, "--arch", "vqgan", "--channel-mult", "1", "2", "2", "4"),
         r"channel_mult \(1, 2, 2, 4\) has 4 entries.*num_downsamples is 2; pass --num-downsamples 3"),
    Case(tokenizer_main, "attention at a resolution never reached",
         lambda w: tok(w, "--arch", "vqgan", "--attention-resolutions", "5"),
         "attention at resolution 5, which the network never reaches.*fix --attention-resolutions"),
    # export
    Case(export_main, "tokenizer folder missing", lambda w: exp(w, tokenizer=str(w.tmp / "none")), "is not a folder"),
    Case(export_main, "not a tokenizer folder", lambda w: exp(w, tokenizer=str(w.codes)), "config.json is missing"),
    Case(export_main, "a prior is not a tokenizer", lambda w: exp(w, tokenizer=str(w.prior)),
         "holds a GatedPixelCNN, not a tokenizer .*; pass a tokenizer folder"),
    Case(export_main, "wrong channel count", lambda w: exp(w, dataset=str(w.tmp / "rgb")),
         "this tokenizer takes 1-channel images", setup=lambda w: write_image_folder(w.tmp / "rgb", {"a": 2})),
    Case(export_main, "size the tokenizer cannot take", lambda w: exp(w, "--image-size", "18"),
         "not divisible by the tokenizer's downsample factor"),
    Case(export_main, "unreadable image", lambda w: exp(w, dataset=broken_image_folder(w)),
         r"cannot read the image at row 1 .*1\.png"),
    Case(export_main, "output inside the dataset", lambda w: exp(w, dataset=str(w.tmp / "grey"),
                                                                 output=str(w.tmp / "grey" / "codes")),
         "inside the dataset folder", setup=lambda w: write_image_folder(w.tmp / "grey", {"a": 2}, mode="L")),
    Case(export_main, "output exists", lambda w: exp(w, output=str(w.codes)), "already exists; pass --overwrite"),
    Case(export_main, "negative workers", lambda w: exp(w, "--num-workers", "-1"), "--num-workers must be 0"),
    Case(export_main, "revision for the digits", lambda w: exp(w, "--revision", "main"),
         "--revision applies to Hub datasets only"),
    # evaluation: the FID Inception weights (an empty $TORCH_HOME: nothing cached)
    Case(tokenizer_evaluate_main, "inception weights that are not a weights file",
         lambda w: ["--tokenizer", str(w.tokenizer), "--inception-weights", str(w.tmp / "inception.pth")],
         "inception.pth is not a PyTorch weights file.*weights-inception-2015-12-05-6726825d.pth",
         setup=lambda w: (w.tmp / "inception.pth").write_text("<html>a download that went wrong</html>")),
    Case(tokenizer_evaluate_main, "inception weights of another network",
         lambda w: ["--tokenizer", str(w.tokenizer), "--inception-weights", str(w.tmp / "other.pth")],
         "other.pth does not hold torch-fidelity's Inception weights",
         setup=lambda w: torch.save({"weight": torch.zeros(3)}, w.tmp / "other.pth")),
    Case(pipeline_evaluate_main, "inception weights missing offline",
         lambda w: ["--pipeline", str(w.pipeline), "--num-images", "4", "--no-progress"],
         r"weights-inception-2015-12-05-6726825d\.pth, not found in .*hub/checkpoints.*--inception-weights PATH"),
    Case(pipeline_evaluate_main, "one sample cannot give an FID",
         lambda w: ["--pipeline", str(w.pipeline), "--num-images", "1"], "--num-images must be at least 4"),
    # stage-2 training
    Case(prior_main, "codes folder missing", lambda w: pri(w, codes=str(w.tmp / "nothing")), "does not exist"),
    Case(prior_main, "not a codes dataset", lambda w: pri(w, codes=str(w.tokenizer)), "codes.json is missing"),
    Case(prior_main, "codes outside the vocabulary", lambda w: pri(w, codes=edited_codes(w, vocab_size=4)),
         r"fall outside \[0, 4\)"),
    Case(prior_main, "metadata disagrees with data", lambda w: pri(w, codes=edited_codes(w, num_rows=5)),
         "says 5 rows"),
    Case(prior_main, "tokenizer disagrees with codes", lambda w: pri(w, "--tokenizer", str(w.tmp / "other_tok")),
         "did not make these codes.*pass the tokenizer that made them", setup=mismatched_tokenizer),
    Case(prior_main, "output holds a trained prior", lambda w: pri(w, output=str(w.prior)), "already holds"),
    Case(prior_main, "bad kernel size", lambda w: pri(w, "--kernel-size", "4"), "--kernel-size must be odd"),
    Case(prior_main, "unknown arch", lambda w: pri(w, "--arch", "pixelcnnx"),
         "invalid choice: 'pixelcnnx' \\(choose from 'gated', 'pixelcnn', .*'transformer', 'var'\\)"),
    Case(prior_main, "an option of another arch", lambda w: pri(w, "--attention-every", "2"),
         "--attention-every is an option of arch pixelsnail, not of gated; pass --arch pixelsnail or drop"),
    Case(prior_main, "a PixelSNAIL without attention", lambda w: pri(w, "--arch", "pixelsnail", "--attention-every", "4"),
         "has no attention layer.*pass --attention-every 1 or less, or more --num-layers"),
    # generate
    Case(generate_main, "pipeline folder missing", lambda w: gen(w, pipeline=str(w.tmp / "none")), "does not exist"),
    Case(generate_main, "pipeline folder incomplete", lambda w: gen(w, pipeline=str(w.tmp / "partial")),
         "incomplete: tokenizer missing", setup=partial_pipeline),
    Case(generate_main, "zero images", lambda w: gen(w, "--num-images", "0"), "at least 1"),
    Case(generate_main, "label out of range", lambda w: gen(w, "--labels", "10"), r"labels must lie in \[0, 10\)"),
    Case(generate_main, "wrong number of labels", lambda w: gen(w, "--labels", "1", "2", "3"),
         "labels must be an int or 2 ints"),
    Case(generate_main, "top-p out of range", lambda w: gen(w, "--top-p", "1.5"), r"top_p must lie in \(0, 1\]"),
    Case(generate_main, "top-k below one", lambda w: gen(w, "--top-k", "0"), "top_k must be an integer of at least 1"),
    Case(generate_main, "a compiled step the arch does not have", lambda w: gen(w, "--method", "compiled",
                                                                                 pipeline=str(w.tmp / "masked")),
         "arch 'pixelcnn' has no compiled step; its methods are naive", setup=lambda w: masked_pipeline(w)),
    Case(generate_main, "temperature negative", lambda w: gen(w, "--temperature", "-1"),
         "temperature must be positive"),
    Case(generate_main, "zero beams (earlier images kept)", lambda w: gen(w, "--num-beams", "0", "--overwrite"),
         "num_beams must be an integer >= 1", setup=earlier_images),
    Case(generate_main, "zero batch size (earlier images kept)", lambda w: gen(w, "--batch-size", "0", "--overwrite"),
         "--batch-size must be at least 1", setup=earlier_images),
    Case(generate_main, "beam search with top-k", lambda w: gen(w, "--num-beams", "2", "--top-k", "5"),
         "beam search looks for the grid of the highest total log-probability.*drop temperature, top_k"),
    Case(generate_main, "greedy with top-p (earlier images kept)",
         lambda w: gen(w, "--temperature", "0", "--top-p", "0.9", "--overwrite"), "greedy decoding.*drop top_k and top_p",
         setup=earlier_images),
    Case(generate_main, "CUDA graphs on a CPU", lambda w: gen(w, "--method", "graph"),
         "method='graph' .* needs the model on a CUDA device"),
    Case(generate_main, "output is a file", lambda w: gen(w), "is a file",
         setup=lambda w: (w.tmp / "images").write_text("not a folder")),
    Case(generate_main, "output not empty", lambda w: gen(w), "is not empty",
         setup=lambda w: (w.tmp / "images").mkdir() or (w.tmp / "images" / "mine.txt").write_text("keep")),
]


@pytest.fixture(scope="module")
def shared_parts(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input_parts")
    export(["--tokenizer", str(tiny_tokenizer), "--output", str(root / "codes"), "--no-progress"])
    train_prior(["--codes", str(root / "codes"), "--output-dir", str(root / "prior"), "--max-steps", "2", *PRIOR_FLAGS])
    Pipeline(VQVAE.from_pretrained(tiny_tokenizer), GatedPixelCNN.from_pretrained(root / "prior")).save_pretrained(
        root / "pipeline")
    return {"tokenizer": tiny_tokenizer, "codes": root / "codes", "prior": root / "prior", "pipeline": root / "pipeline"}


@pytest.mark.parametrize("case", COMMAND_CASES, ids=lambda case: f"{case.command.__module__.split('.')[0]}: {case.name}")
def test_command_bad_input(case, shared_parts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty cache: LPIPS weights are missing
    # offline, as on a machine without network (both libraries read HF_HUB_OFFLINE once, at import)
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    where = Where(tmp=tmp_path, **shared_parts)
    case.setup(where)
    argv = case.argv(where)  # may build input folders too: before the snapshot
    watched = [tmp_path, *shared_parts.values()]
    before = [tree_digest(path) for path in watched]
    code = case.command(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err[-2000:]
    assert "Traceback" not in captured.err
    assert re.search(case.message, lines[0]), lines[0]
    assert [tree_digest(path) for path in watched] == before, "a file that existed before was changed"


def tiny_pipeline(conditional: bool = True) -> Pipeline:
    tokenizer = VQVAE(VQVAEConfig(image_size=16, hidden_channels=4, latent_channels=4, num_res_blocks=1,
                                  codebook_size=16))
    prior = GatedPixelCNN(PriorConfig(vocab_size=16, latent_shape=(4, 4), num_classes=3 if conditional else None,
                                      hidden_channels=4, num_layers=1))
    return Pipeline(tokenizer, prior)


API_CASES = [
    ("VQVAEConfig indivisible size", lambda: VQVAEConfig(image_size=30), "not divisible"),
    ("VQVAE.encode wrong channels", lambda: VQVAE(VQVAEConfig()).encode(torch.zeros(1, 3, 32, 32)), r"\(B, 1, H, W\)"),
    ("VQVAE.decode out of range", lambda: VQVAE(VQVAEConfig(codebook_size=16)).decode(torch.full((1, 8, 8), 16)),
     r"codes must lie in \[0, 16\)"),
    ("VQVAE.from_pretrained not a folder", lambda: VQVAE.from_pretrained("/nonexistent"), "is not a folder"),
    ("prior codes out of range", lambda: tiny_pipeline().prior(torch.full((1, 4, 4), 16), 0), r"\[0, 16\)"),
    ("prior labels on unconditional", lambda: tiny_pipeline(False).prior.sample(1, labels=0), "unconditional"),
    ("prior label too large", lambda: tiny_pipeline().prior.sample(1, labels=3), r"labels must lie in \[0, 3\)"),
    ("prior top_p zero", lambda: tiny_pipeline().prior.sample(1, labels=0, top_p=0.0), "top_p"),
    ("prior top_k zero", lambda: tiny_pipeline().prior.sample(1, labels=0, top_k=0), "top_k"),
    ("prior temperature negative", lambda: tiny_pipeline().prior.sample(1, labels=0, temperature=-1.0), "temperature"),
    ("pipeline mismatch", lambda: Pipeline(tiny_pipeline().tokenizer, GatedPixelCNN(PriorConfig(vocab_size=17,
                                                                                                latent_shape=(4, 4)))),
     "vocab_size 17 differs from the tokenizer's codebook_size 16"),
    ("pipeline zero images", lambda: tiny_pipeline().generate(0), "num_images must be an integer of at least 1"),
    ("pipeline labels on unconditional", lambda: tiny_pipeline(False).generate(1, labels=0), "unconditional"),
    ("pipeline encode wrong size", lambda: tiny_pipeline().encode(torch.zeros(1, 1, 32, 32)), r"\(B, 1, 16, 16\)"),
    ("pipeline complete mask shape", lambda: tiny_pipeline().complete(torch.zeros(1, 1, 16, 16),
                                                                      torch.ones(1, 4, 4, dtype=torch.bool)),
     "known_mask must be"),
]


@pytest.mark.parametrize("name, call, message", API_CASES, ids=[case[0] for case in API_CASES])
def test_api_bad_input(name, call, message):
    with pytest.raises(ValueError, match=message):
        call()
