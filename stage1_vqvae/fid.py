"""Fréchet Inception Distance (Heusel et al. 2017, the TTUR paper) between two image sets, from
streamed features, offline.

The network is torch-fidelity's port of the TensorFlow Inception graph of 2015-12-05 that the FID
paper's code uses, with its pool3 features (2048-d) and TF1's bilinear resize to 299x299 (no
antialiasing), so numbers compare with torch-fidelity, pytorch-fid and the papers that use them. Its
weights are read from a local file: `--inception-weights PATH`, or the file torch-fidelity and
torchmetrics download into torch.hub's cache, $TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth.
Nothing is downloaded here.

torchmetrics' FrechetInceptionDistance keeps the statistics (feature sums and sums of outer
products, in float64) and computes the distance from the eigenvalues of sigma_1 sigma_2, so no
feature matrix is ever held in memory and there is no hand-written matrix square root.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from shared.errors import UserError

INCEPTION_FEATURES = 2048  # pool3, the layer of the FID paper
FEATURE_BATCH = 32  # images per Inception forward: activations at 299x299 are large


def inception_weights_file() -> Path:
    """Where torch-fidelity (and torchmetrics through it) downloads the FID Inception weights:
    torch.hub's cache, $TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def resolve_inception_weights(path: str | os.PathLike | None) -> Path:
    """The weights file to use (`path`, or the cached download), checked: it exists and holds tensors.
    UserError naming the file and where it goes otherwise."""
    default = inception_weights_file()
    if path is None:
        if not default.is_file():
            raise UserError(f"FID needs torch-fidelity's Inception weights {default.name}, not found in "
                            f"{default.parent} ($TORCH_HOME/hub/checkpoints) and not downloadable offline; "
                            "copy the file there or pass --inception-weights PATH")
        path = default
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--inception-weights {path} does not exist; pass the path of torch-fidelity's "
                        f"Inception weights {default.name}")
    try:
        # weights_only: a file that would run code when unpickled is refused before torch-fidelity opens it
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several types for a file that is not a checkpoint
        raise UserError(f"{path} is not a PyTorch weights file (torch.load with weights_only=True fails on it); "
                        f"pass torch-fidelity's Inception weights {default.name} to --inception-weights") from None
    if not isinstance(state, dict) or not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors; pass torch-fidelity's Inception weights "
                        f"{default.name} to --inception-weights")
    return path


class FrechetDistance:
    """FID between real and generated images, streamed batch by batch.

        fid = FrechetDistance(weights=None, device="cuda")   # the cached weights file
        fid.add(originals, real=True); fid.add(reconstructions, real=False)
        fid.compute()                                         # a float, 0 for identical sets

    Images are (B, C, H, W) in [-1, 1], grey (repeated to RGB) or RGB, any size.
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        path = resolve_inception_weights(weights)
        try:
            # reset_real_features=False: clear_generated() keeps the reference statistics
            metric = FrechetInceptionDistance(feature=INCEPTION_FEATURES, reset_real_features=False,
                                              feature_extractor_weights_path=str(path), antialias=False)
        except RuntimeError:  # load_state_dict: missing, unexpected or misshapen tensors
            raise UserError(f"{path} does not hold torch-fidelity's Inception weights (the names or shapes of its "
                            f"tensors differ from the network's); pass {inception_weights_file().name} to "
                            "--inception-weights") from None
        self.metric = metric.to(device)
        self.device = torch.device(device)

    @property
    def num_real(self) -> int:
        return int(self.metric.real_features_num_samples)

    @property
    def num_generated(self) -> int:
        return int(self.metric.fake_features_num_samples)

    @torch.no_grad()
    def add(self, images: torch.Tensor, real: bool) -> None:
        """Add images (B, C, H, W) in [-1, 1] to the real or the generated set."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"FID takes images (B, 1 or 3, H, W), got {tuple(images.shape)}")
        pixels = images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)  # what a PNG would hold
        pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels  # (B, 3, H, W)
        for chunk in pixels.split(FEATURE_BATCH):
            self.metric.update(chunk.to(self.device), real=real)

    def compute(self) -> float:
        """The distance between the two sets so far (each needs at least 2 images)."""
        if min(self.num_real, self.num_generated) < 2:
            raise UserError(f"FID needs at least 2 images in each set, got {self.num_real} real and "
                            f"{self.num_generated} generated")
        return float(self.metric.compute())

    def clear_generated(self) -> None:
        """Forget the generated images, keep the real ones (to compare another set with the same reference)."""
        self.metric.reset()
