"""Stage 1: the VQ-VAE model, its train and evaluate commands."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TOKENIZER_FLAGS, run_module, run_torchrun
from shared.errors import UserError
from stage1_vqvae import VQVAE, VQVAEConfig
from stage1_vqvae.evaluate import evaluate
from stage1_vqvae.train import train

TINY = dict(in_channels=1, image_size=16, hidden_channels=8, latent_channels=8, num_res_blocks=1, codebook_size=16)


@pytest.mark.parametrize("quantizer, extra", [("vq", {}), ("vq", {"codebook_dim": 4, "use_cosine_sim": True}),
                                              ("fsq", {"codebook_size": 27, "fsq_levels": (3, 3, 3)})])
@pytest.mark.parametrize("num_downsamples", [1, 2])
def test_shapes_and_round_trip(quantizer, extra, num_downsamples):
    model = VQVAE(VQVAEConfig(**{**TINY, **extra}, quantizer=quantizer, num_downsamples=num_downsamples))
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    model.train()
    model(images)  # k-means init and one EMA update
    model.eval()
    output = model(images)
    side = 16 // 2 ** num_downsamples
    assert model.latent_shape == (side, side)
    assert output.reconstruction.shape == images.shape and output.codes.shape == (4, side, side)
    assert output.codes.dtype == torch.int64 and 0 <= output.codes.min() and output.codes.max() < model.codebook_size
    codes = model.encode(images)
    assert torch.equal(codes, output.codes)
    assert torch.allclose(model.decode(codes), output.reconstruction, atol=1e-6)


def test_encode_never_updates_codebook():
    model = VQVAE(VQVAEConfig(**TINY)).train()
    model(torch.rand(4, 1, 16, 16))
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.encode(torch.rand(4, 1, 16, 16))
    assert model.training and all(torch.equal(before[name], buffer) for name, buffer in model.named_buffers())


def test_save_load_identical(tmp_path):
    model = VQVAE(VQVAEConfig(**TINY, codebook_dim=4))
    model(torch.rand(8, 1, 16, 16))
    model.eval()
    model.save_pretrained(tmp_path / "tok")
    loaded = VQVAE.from_pretrained(tmp_path / "tok")
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    assert torch.equal(loaded(images).reconstruction, model(images).reconstruction)
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["_class_name"] == "VQVAE"


def test_bad_model_inputs(tmp_path):
    with pytest.raises(ValueError, match="not divisible by the downsample factor 4"):
        VQVAEConfig(image_size=30)
    with pytest.raises(ValueError, match="product of --fsq-levels"):
        VQVAEConfig(quantizer="fsq", codebook_size=100)
    model = VQVAE(VQVAEConfig(**TINY)).eval()
    with pytest.raises(ValueError, match=r"images must be \(B, 1, H, W\)"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        model.decode(torch.full((1, 4, 4), 16))
    with pytest.raises(ValueError, match="config.json is missing"):
        VQVAE.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path / "tok")
    weights = tmp_path / "tok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated"):
        VQVAE.from_pretrained(tmp_path / "tok")


def test_train_leaves_loadable_folder(tiny_tokenizer):
    model = VQVAE.from_pretrained(tiny_tokenizer)
    assert model.latent_shape == (4, 4) and model.codebook_size == 32
    assert (tiny_tokenizer / "train_config.json").is_file()
    assert list((tiny_tokenizer / "samples").glob("reconstructions_*.png"))
    metrics = json.loads((tiny_tokenizer / "metrics.json").read_text())
    assert metrics["psnr"] > 12 and 0 < metrics["codebook_usage"] <= 100


def test_resume_restores_step_and_weights(tmp_path):
    flags = ["--save-every", "5", "--eval-every", "100", *TINY_TOKENIZER_FLAGS]
    train(["--output-dir", str(tmp_path / "straight"), "--max-steps", "10", *flags])
    train(["--output-dir", str(tmp_path / "resumed"), "--max-steps", "10", *flags])
    # as if the run had died after step 5: only the step-5 checkpoint is left
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000010")
    (tmp_path / "resumed" / "model.safetensors").unlink()
    (tmp_path / "resumed" / "config.json").unlink()
    train(["--output-dir", str(tmp_path / "resumed"), "--max-steps", "10", "--resume", *flags])
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]


def test_evaluate_prints_metrics(tiny_tokenizer, capsys):
    result = evaluate(["--tokenizer", str(tiny_tokenizer), "--split", "test", "--no-fid"])  # rFID: test_metrics.py
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["num_images"] == 180 and set(printed) >= {"psnr", "ssim", "codebook_usage", "perplexity"}
    assert 0 < result["ssim"] <= 1 and "rfid" not in result


def test_lpips_loads_from_prefilled_torch_home(tmp_path, monkeypatch):
    import torchvision

    from stage1_vqvae.losses import PerceptualLoss, lpips_trunk_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(UserError, match=r"alexnet-owt-.*\.pth.*hub/checkpoints.*--perceptual-weight 0"):
        PerceptualLoss("alex")
    trunk = lpips_trunk_file("alex")
    trunk.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), trunk)  # stands in for the ImageNet weights
    loss = PerceptualLoss("alex")
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    assert loss(images, images).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(images, -images).item() > 0
    assert not any(p.requires_grad for p in loss.network.parameters()) and not loss.network.training
    assert loss.state_dict() == {}  # never saved with the model


def test_two_process_torchrun_keeps_codebooks_identical(tmp_path):
    """Also with the discriminator from step 8: the adaptive weight's gradients under DDP."""
    result = run_torchrun("stage1_vqvae.train", "--output-dir", str(tmp_path / "ddp"), "--max-steps", "12",
                          "--eval-every", "6", "--save-every", "6", "--discriminator-weight", "0.1",
                          "--discriminator-start", "8", "--discriminator-layers", "2", *TINY_TOKENIZER_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["replica_max_abs_difference"] == 0.0
    model = VQVAE.from_pretrained(tmp_path / "ddp")
    assert model.quantizer._codebook.initted.item()
    checkpoint = tmp_path / "ddp" / "checkpoints" / "step_00000012"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert (checkpoint / "model_1.safetensors").is_file() and (checkpoint / "optimizer_1.bin").is_file()


def test_cli_subprocess_exit_code_and_one_line(tmp_path):
    result = run_module("stage1_vqvae.evaluate", "--tokenizer", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "is not a folder" in result.stderr


def test_bf16_accumulation_and_tensorboard_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = train(["--output-dir", str(tmp_path / "run"), "--max-steps", "4", "--eval-every", "2", "--log-every", "1",
                     "--save-every", "4", "--mixed-precision", "bf16", "--gradient-accumulation-steps", "2",
                     "--report-to", "tensorboard", *TINY_TOKENIZER_FLAGS])
    assert metrics["psnr"] > 0
    event_files = sorted((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    tags = set()
    for path in event_files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/lr", "validation/psnr", "validation/codebook_usage"} <= tags
    steps = [event.step for path in event_files for event in _scalars(path, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4]


def _scalars(path, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    return accumulator.Scalars(tag) if tag in accumulator.Tags()["scalars"] else []


def test_preset_fills_in_what_the_command_line_leaves_out():
    from shared.config import parse_args
    from stage1_vqvae.train import PRESETS, apply_preset, parser

    args = apply_preset(parse_args(parser(), ["--output-dir", "x", "--preset", "photos", "--codebook-size", "2048"]))
    assert args.codebook_size == 2048  # given explicitly: it wins
    assert all(getattr(args, name) == value for name, value in PRESETS["photos"].items() if name != "codebook_size")
    plain = apply_preset(parse_args(parser(), ["--output-dir", "x"]))
    assert not hasattr(plain, "arch")  # no preset: the config's own defaults apply
