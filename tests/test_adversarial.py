"""The VQGAN adversarial loss: PatchGAN discriminator, hinge losses, adaptive weight, and training with them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import TINY_TOKENIZER_FLAGS
from shared.errors import UserError
from stage1_vqvae import VQVAE, VQVAEConfig
from stage1_vqvae.discriminator import PatchDiscriminator, check_discriminator_depth, patch_grid_side
from stage1_vqvae.losses import adaptive_weight, discriminator_hinge_loss, generator_adversarial_loss
from stage1_vqvae.train import train

TINY = dict(in_channels=1, image_size=16, hidden_channels=8, latent_channels=8, num_res_blocks=1, codebook_size=16)


@pytest.mark.parametrize("image_size, layers", [(16, 1), (16, 2), (32, 3), (24, 2), (256, 3)])
def test_patch_map_side_and_initialisation(image_size, layers):
    discriminator = PatchDiscriminator(3, layers)
    logits = discriminator(torch.randn(2, 3, image_size, image_size))
    side = patch_grid_side(image_size, layers)
    assert logits.shape == (2, 1, side, side)
    assert image_size != 256 or side == 30  # pix2pix's 70x70 PatchGAN gives 30x30 patches on 256px images
    convolutions = [module for module in discriminator.modules() if isinstance(module, torch.nn.Conv2d)]
    assert len(convolutions) == layers + 2
    widest = max(convolutions, key=lambda conv: conv.weight.numel())
    assert widest.weight.std().item() == pytest.approx(0.02, rel=0.1) and abs(widest.weight.mean().item()) < 2e-3
    norms = [module for module in discriminator.modules() if isinstance(module, torch.nn.GroupNorm)]
    assert all(norm.weight.mean().item() == pytest.approx(1.0, abs=0.02) and not norm.bias.any() for norm in norms)


def test_discriminator_judges_each_image_alone():
    """GroupNorm: real and fake images can share one forward without sharing statistics."""
    discriminator = PatchDiscriminator(1, 2).train()
    real, fake = torch.rand(4, 1, 16, 16) * 2 - 1, torch.rand(4, 1, 16, 16) * 2 - 1
    together = discriminator(torch.cat([real, fake]))
    assert torch.allclose(together[:4], discriminator(real), atol=1e-6)
    assert torch.allclose(together[4:], discriminator(fake), atol=1e-6)
    assert torch.allclose(together[:1], discriminator(real[:1]), atol=1e-6)


def test_too_deep_discriminator_names_the_fix():
    check_discriminator_depth(16, 2)
    with pytest.raises(UserError, match="--discriminator-layers 2 or a larger --image-size"):
        check_discriminator_depth(16, 3)


def test_hinge_losses():
    confident_real, confident_fake = torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -1.0)
    assert discriminator_hinge_loss(confident_real, confident_fake).item() == 0.0
    undecided = torch.zeros(2, 1, 3, 3)
    assert discriminator_hinge_loss(undecided, undecided).item() == pytest.approx(2.0)
    logits = torch.tensor([[[[0.5, -2.0]]], [[[3.0, 0.0]]]])  # (2, 1, 1, 2)
    expected = F.relu(1 - logits).mean() + F.relu(1 + logits.flip(0)).mean()
    assert discriminator_hinge_loss(logits, logits.flip(0)).item() == pytest.approx(expected.item())
    assert generator_adversarial_loss(logits).item() == pytest.approx(-0.375)


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    model = VQVAE(VQVAEConfig(**TINY))
    discriminator = PatchDiscriminator(1, 2)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    reconstruction = model(images).reconstruction
    reconstruction_loss = F.mse_loss(reconstruction, images)
    adversarial_loss = generator_adversarial_loss(discriminator(reconstruction))
    last_layer = model.decoder.conv_out.weight
    weight = adaptive_weight(reconstruction_loss, adversarial_loss, last_layer)
    assert not weight.requires_grad

    def gradient_norm(loss: torch.Tensor) -> float:
        model.zero_grad()
        loss.backward(retain_graph=True)  # the graphs survived adaptive_weight
        return last_layer.grad.norm().item()

    expected = gradient_norm(reconstruction_loss) / (gradient_norm(adversarial_loss) + 1e-4)
    assert weight.item() == pytest.approx(expected, rel=1e-5) and 0 < expected < 1e4
    # a vanishing adversarial gradient is clamped at 1e4 instead of exploding
    assert adaptive_weight(reconstruction_loss * 1e6, adversarial_loss * 1e-12, last_layer).item() == 1e4


def test_discriminator_starts_at_its_step_and_leaves_earlier_steps_alone(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--max-steps", "5", "--save-every", "1", "--keep-checkpoints", "5", "--eval-every", "100",
             "--log-every", "1", *TINY_TOKENIZER_FLAGS]
    adversarial = ["--discriminator-weight", "0.5", "--discriminator-start", "3", "--discriminator-layers", "2",
                   "--report-to", "tensorboard"]
    train(["--output-dir", str(tmp_path / "gan"), *flags, *adversarial])
    train(["--output-dir", str(tmp_path / "plain"), *flags])

    def checkpoint(run: str, step: int, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(tmp_path / run / "checkpoints" / f"step_{step:08d}" / name))

    # steps 1-3 (indices 0-2) train the tokenizer exactly as without a discriminator, which stays as built
    for name, tensor in checkpoint("plain", 3, "model.safetensors").items():
        assert torch.equal(tensor, checkpoint("gan", 3, "model.safetensors")[name]), name
    first = checkpoint("gan", 1, "model_1.safetensors")
    assert all(torch.equal(first[name], tensor) for name, tensor in checkpoint("gan", 3, "model_1.safetensors").items())
    fourth = checkpoint("gan", 4, "model_1.safetensors")
    assert any(not torch.equal(first[name], tensor) for name, tensor in fourth.items())
    scalars = {}
    for path in (tmp_path / "gan" / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(event.step for event in accumulator.Scalars(tag))
    for tag in ("train/d_loss", "train/g_adv", "train/adaptive_weight"):
        assert sorted(scalars[tag]) == [4, 5], tag
