"""Feature networks for sample quality: whose activations FID and precision/recall compare.

- `FeatureNetwork`: a small convolutional classifier trained on a dataset's train split
  (`python -m pipelines.features`), saved as a pretrained folder. Its penultimate activations are the
  features: the usual "FID with a domain classifier" for MNIST-like data, where ImageNet's Inception
  sees little; its predictions give the class accuracy of class-conditional samples.
- `InceptionFeatures`: the FID Inception network (pool3, 2048-d) from its local weights file.

Both take images (B, C, H, W) in [-1, 1] and return features (B, F) in float64.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from shared.config import option
from shared.errors import UserError
from shared.pretrained import PretrainedModel
from stage1_vqvae import fid


@dataclasses.dataclass(frozen=True)
class FeatureNetworkConfig:
    """A classifier of `image_size` images with `in_channels` channels into `num_classes` classes."""

    in_channels: int = option(1, "image channels")
    image_size: int = option(32, "image side the network was trained at (images are resized to it)")
    num_classes: int = option(10, "classes")
    width: int = option(32, "channels of the first block (doubled by each of the three blocks)")
    dataset: str = option("", "the dataset it was trained on (provenance)")

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3) or self.image_size < 8 or self.num_classes < 2 or self.width < 1:
            raise UserError("a feature network needs 1 or 3 channels, images of at least 8 px, at least 2 classes "
                            "and a positive width")


class FeatureNetwork(PretrainedModel):
    """Three blocks of two 3x3 convolutions (GroupNorm, ReLU), each followed by 2x2 pooling, then a global
    average: the features (4 x width); a linear layer gives the class logits."""

    config_class = FeatureNetworkConfig

    def __init__(self, config: FeatureNetworkConfig) -> None:
        super().__init__(config)
        blocks, channels = [], config.in_channels
        for index in range(3):
            width = config.width * 2 ** index
            blocks += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.body = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels, config.num_classes)

    @property
    def feature_size(self) -> int:
        return self.classifier.in_features

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] at the network's size and channel count."""
        config = self.config
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"feature networks take images (B, 1 or 3, H, W), got {tuple(images.shape)}")
        if images.shape[1] != config.in_channels:
            raise UserError(f"the feature network reads {config.in_channels}-channel images, these have "
                            f"{images.shape[1]}; pass a feature network trained on images like these")
        if images.shape[2:] != (config.image_size, config.image_size):
            images = F.interpolate(images.float(), size=(config.image_size,) * 2, mode="bilinear", antialias=True,
                                   align_corners=False)
        return images.float()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> penultimate activations (B, F) in float64."""
        return self.body(self.prepare(images)).mean((2, 3)).double()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> class logits (B, num_classes)."""
        return self.classifier(self.body(self.prepare(images)).mean((2, 3)))


class InceptionFeatures(nn.Module):
    """The FID Inception network's pool3 features (B, 2048), from torch-fidelity's weights file
    (`--inception-weights`, or the file in $TORCH_HOME/hub/checkpoints)."""

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.path = fid.resolve_inception_weights(weights)
        try:
            metric = FrechetInceptionDistance(feature=fid.INCEPTION_FEATURES, feature_extractor_weights_path=str(self.path),
                                              antialias=False)
        except RuntimeError:  # load_state_dict: missing, unexpected or misshapen tensors
            raise UserError(f"{self.path} does not hold torch-fidelity's Inception weights (the names or shapes of its "
                            "tensors differ from the network's); pass the right file to --inception-weights") from None
        self.inception = metric.inception

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)  # what a PNG would hold
        pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels  # (B, 3, H, W)
        return torch.cat([self.inception(chunk).double() for chunk in pixels.split(fid.FEATURE_BATCH)])
