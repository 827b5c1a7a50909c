"""Reconstruction and perceptual losses, and the offline-safe LPIPS loader."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError

# The torchvision ImageNet trunk each LPIPS variant builds; lpips ships only its small linear heads.
MIN_LPIPS_SIZE = 64
LPIPS_TRUNK_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def lpips_trunk_file(net: str) -> Path:
    """Where torch.hub looks for the LPIPS trunk weights: $TORCH_HOME/hub/checkpoints/<file>."""
    import torchvision.models as models

    weights = getattr(models, LPIPS_TRUNK_WEIGHTS[net]).IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


class PerceptualLoss(nn.Module):
    """Frozen LPIPS (Zhang et al. 2018) in eval mode. Grey images are repeated to 3 channels, and
    images smaller than 64 px are upsampled to 64 (the ImageNet trunks shrink 16 px to nothing).

    Its weights are kept out of `state_dict`, so they never enter model.safetensors or checkpoints.
    """

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        trunk_file = lpips_trunk_file(net)
        if not trunk_file.is_file():
            raise UserError(f"LPIPS needs the {net} trunk weights {trunk_file.name}, not found in {trunk_file.parent} "
                            "($TORCH_HOME/hub/checkpoints) and not downloadable offline; copy the file there "
                            "or pass --perceptual-weight 0")
        import lpips

        network = lpips.LPIPS(net=net, verbose=False).eval()
        network.requires_grad_(False)
        object.__setattr__(self, "network", network)  # not a submodule: out of state_dict and optimizer

    def _apply(self, fn, recurse=True):  # .to(device) must still move the hidden network
        self.network._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance between two batches (B, C, H, W) in [-1, 1]."""
        if reconstruction.shape[1] == 1:
            reconstruction, target = reconstruction.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        if min(reconstruction.shape[2:]) < MIN_LPIPS_SIZE:
            scale = MIN_LPIPS_SIZE / min(reconstruction.shape[2:])
            reconstruction = F.interpolate(reconstruction, scale_factor=scale, mode="bilinear", align_corners=False)
            target = F.interpolate(target, scale_factor=scale, mode="bilinear", align_corners=False)
        return self.network(reconstruction, target).mean()


def reconstruction_loss(kind: str, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(reconstruction, target) if kind == "mse" else F.l1_loss(reconstruction, target)


# ------------------------------------------------------------------------------------------------
# Adversarial losses (VQGAN: Esser et al. 2021, sec. 3.1)
# ------------------------------------------------------------------------------------------------

ADAPTIVE_WEIGHT_EPSILON = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


def discriminator_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (Lim & Ye 2017; as taming-transformers trains VQGAN):
    mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), over every patch logit. Zero once real
    patches score at least 1 and fake ones at most -1."""
    return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The tokenizer's adversarial loss: -mean(D(reconstruction)) (the hinge GAN's generator term)."""
    return -logits_fake.float().mean()


def adaptive_weight(reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor,
                    last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance between the two losses (Esser et al. 2021, sec. 3.1, eq. 7):
    ||grad of the reconstruction loss|| / (||grad of the adversarial loss|| + 1e-4), both taken at
    the decoder's last layer weight, clamped to [0, 1e4] and detached (a scale, not a path for
    gradients). `reconstruction_loss` includes the perceptual term. Keeps both graphs for backward."""
    reconstruction_grad, = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    adversarial_grad, = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)
    weight = reconstruction_grad.float().norm() / (adversarial_grad.float().norm() + ADAPTIVE_WEIGHT_EPSILON)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()
