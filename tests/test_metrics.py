"""Reconstruction metrics against scikit-image, and FID with a locally made Inception weights file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import write_image_folder
from shared.errors import UserError
from stage1_vqvae.metrics import MAX_PSNR, psnr_per_image, ssim_per_image


def photo_crops() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """32x32 crops of scikit-image's astronaut photograph in [0, 1] (N, 32, 32, 3), a noisy copy and a blurred one."""
    from scipy.ndimage import uniform_filter
    from skimage.data import astronaut

    photo = astronaut().astype(np.float64) / 255.0  # (512, 512, 3)
    crops = np.stack([photo[top:top + 32, left:left + 32] for top, left in [(60, 200), (300, 40), (20, 400),
                                                                             (250, 250), (420, 300)]])
    rng = np.random.default_rng(0)
    noisy = np.clip(crops + rng.normal(0.0, 0.08, crops.shape), 0.0, 1.0)
    blurred = uniform_filter(crops, size=(1, 3, 3, 1), mode="nearest")
    # compare what the model sees: float32 pixels
    return tuple(array.astype(np.float32) for array in (crops, noisy, blurred))


def as_model_images(array: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) in [0, 1] -> (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(array).permute(0, 3, 1, 2) * 2 - 1


@pytest.mark.parametrize("distortion", ["noisy", "blurred"])
@pytest.mark.parametrize("grey", [False, True])
def test_ssim_and_psnr_match_scikit_image(distortion, grey):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    crops, noisy, blurred = photo_crops()
    other = noisy if distortion == "noisy" else blurred
    if grey:
        crops, other = crops.mean(-1, keepdims=True), other.mean(-1, keepdims=True)
    ours_ssim = ssim_per_image(as_model_images(other), as_model_images(crops))
    ours_psnr = psnr_per_image(as_model_images(other), as_model_images(crops))
    # scikit-image on the same float32 pixels the model sees, computed in float64
    reference_ssim = [structural_similarity(b.astype(np.float64), a.astype(np.float64), gaussian_weights=True,
                                            sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2)
                      for a, b in zip(crops, other)]
    reference_psnr = [peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=1.0)
                      for a, b in zip(crops, other)]
    assert ours_ssim.shape == ours_psnr.shape == (len(crops),)
    assert np.abs(ours_ssim.numpy() - reference_ssim).max() < 1e-3, (ours_ssim, reference_ssim)
    assert np.abs(ours_psnr.numpy() - reference_psnr).max() < 1e-3, (ours_psnr, reference_psnr)
    assert 0.1 < min(reference_ssim) and max(reference_ssim) < 0.99  # distorted enough that a wrong border would show


def test_identical_images_and_tiny_images():
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    assert torch.equal(psnr_per_image(images, images), torch.full((3,), MAX_PSNR))
    assert torch.allclose(ssim_per_image(images, images), torch.ones(3))
    with pytest.raises(UserError, match="at least 11x11"):
        ssim_per_image(images[..., :8, :8], images[..., :8, :8])


# ------------------------------------------------------------------------------------------------
# FID
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A stand-in for the FID Inception weights: the network's own freshly initialised weights, saved
    to disk (no download). The convolutions get He initialisation: PyTorch's default shrinks the
    activations about 6x per layer, which leaves the 2048-d pool features near 1e-8."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    class Unloaded(inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the initial weights
            return None

    original = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *args, **kwargs: {}  # never download
    try:
        torch.manual_seed(0)
        network = Unloaded("inception-v3-compat", ["2048"])
    finally:
        inception.load_state_dict_from_url = original
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-made-here.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture
def small_features(monkeypatch) -> None:
    """FID on Inception's 64-d first pooled features instead of pool3's 2048: the same network,
    weights file and statistics, but a 64x64 eigenproblem instead of a 2048x2048 one (tens of
    seconds on 2 busy cores)."""
    import stage1_vqvae.fid

    monkeypatch.setattr(stage1_vqvae.fid, "INCEPTION_FEATURES", 64)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(inception_weights, small_features):
    from stage1_vqvae.fid import FrechetDistance

    images = torch.rand(6, 1, 16, 16) * 2 - 1
    fid = FrechetDistance(inception_weights)
    fid.add(images, real=True)
    fid.add(images, real=False)
    same = fid.compute()
    distances = []
    for noise in (0.1, 0.5):
        fid.clear_generated()  # keeps the real statistics
        fid.add((images + noise * torch.randn_like(images)).clamp(-1, 1), real=False)
        distances.append(fid.compute())
    assert (fid.num_real, fid.num_generated) == (6, 6)
    assert abs(same) < 1e-4 * distances[0] and 0 < distances[0] < distances[1], (same, distances)


def test_fid_equals_the_formula_computed_independently(inception_weights, small_features):
    """FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) (Heusel et al. 2017, eq. 6), here from the
    network's features with numpy's statistics and scipy's matrix square root, against FrechetDistance."""
    from scipy import linalg

    from stage1_vqvae.fid import FrechetDistance

    generator = torch.Generator().manual_seed(3)
    real = torch.rand(40, 3, 16, 16, generator=generator) * 2 - 1
    fake = (real[:30] * 0.7 + 0.3 * torch.rand(30, 3, 16, 16, generator=generator)).clamp(-1, 1)
    fid = FrechetDistance(inception_weights)
    fid.add(real, real=True)
    fid.add(fake, real=False)

    def features(images: torch.Tensor) -> np.ndarray:
        pixels = images.add(1).mul(127.5).round().to(torch.uint8)  # what FrechetDistance feeds the network
        with torch.no_grad():
            return fid.metric.inception(pixels).double().numpy()  # (N, 64)

    real_features, fake_features = features(real), features(fake)
    mean_real, mean_fake = real_features.mean(0), fake_features.mean(0)
    cov_real, cov_fake = np.cov(real_features, rowvar=False), np.cov(fake_features, rowvar=False)
    root = linalg.sqrtm(cov_real @ cov_fake).real
    expected = ((mean_real - mean_fake) ** 2).sum() + np.trace(cov_real + cov_fake - 2 * root)
    assert expected > 0.01 and fid.compute() == pytest.approx(expected, rel=1e-4)


def test_fid_reads_pool3_features_by_default(inception_weights):
    """The commands' FID: 2048-d pool3 statistics in float64 (computing it is a 2048x2048 eigenproblem,
    left to the tests above at 64-d)."""
    from stage1_vqvae.fid import FrechetDistance

    fid = FrechetDistance(inception_weights)
    fid.add(torch.rand(2, 3, 16, 16) * 2 - 1, real=True)
    assert fid.metric.inception.features_list == ["2048"] and fid.num_real == 2
    assert fid.metric.real_features_sum.shape == (2048,) and fid.metric.real_features_cov_sum.dtype == torch.float64
    assert fid.metric.real_features_sum.abs().sum() > 0


def test_inception_weights_missing_or_wrong(inception_weights, tmp_path, monkeypatch):
    from stage1_vqvae.fid import FrechetDistance, inception_weights_file, resolve_inception_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert inception_weights_file() == tmp_path / "torch_home" / "hub" / "checkpoints" / \
        "weights-inception-2015-12-05-6726825d.pth"  # where torch-fidelity downloads it
    with pytest.raises(UserError, match=r"weights-inception-2015-12-05-6726825d\.pth, not found in .*torch_home/hub/"
                                        r"checkpoints .*not downloadable offline; copy the file there or pass "
                                        r"--inception-weights"):
        FrechetDistance()
    with pytest.raises(UserError, match="does not exist"):
        FrechetDistance(tmp_path / "nowhere.pth")
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(UserError, match="is not a PyTorch weights file"):
        FrechetDistance(tmp_path / "text.pth")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(UserError, match="does not hold torch-fidelity's Inception weights"):
        FrechetDistance(tmp_path / "linear.pth")
    # the file in the cache folder is found without the flag
    inception_weights_file().parent.mkdir(parents=True)
    inception_weights_file().symlink_to(inception_weights)
    assert resolve_inception_weights(None) == inception_weights_file()


def test_tokenizer_evaluate_reports_rfid(inception_weights, small_features, tmp_path, capsys):
    from stage1_vqvae import VQVAE, VQVAEConfig
    from stage1_vqvae.evaluate import evaluate

    VQVAE(VQVAEConfig(image_size=16, hidden_channels=8, latent_channels=8, num_res_blocks=1, codebook_size=16,
                      in_channels=3)).save_pretrained(tmp_path / "tokenizer")
    folder = write_image_folder(tmp_path / "photos", {"a": 3}, size=(16, 16))
    result = evaluate(["--tokenizer", str(tmp_path / "tokenizer"), "--dataset", str(folder), "--split", "train",
                       "--inception-weights", str(inception_weights), "--num-workers", "0"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["num_images"] == 3 and result["rfid"] > 0 and 0 <= result["ssim"] <= 1  # untrained: far from equal


def test_pipeline_evaluate_reports_fid_of_samples(inception_weights, small_features, tmp_path, capsys):
    from pipelines import Pipeline
    from pipelines.evaluate import evaluate
    from stage1_vqvae import VQVAE, VQVAEConfig
    from stage2_prior import GatedPixelCNN, PriorConfig

    tokenizer = VQVAE(VQVAEConfig(image_size=16, hidden_channels=4, latent_channels=4, num_res_blocks=1,
                                  codebook_size=16))
    prior = GatedPixelCNN(PriorConfig(vocab_size=16, latent_shape=(4, 4), hidden_channels=4, num_layers=1))
    Pipeline(tokenizer, prior).save_pretrained(tmp_path / "pipeline")
    folder = write_image_folder(tmp_path / "digits", {"a": 10}, size=(16, 16), mode="L")
    argv = ["--pipeline", str(tmp_path / "pipeline"), "--dataset", str(folder), "--split", "train", "--num-images",
            "4", "--inception-weights", str(inception_weights), "--num-workers", "0", "--no-progress"]
    result = evaluate(argv)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result and set(result) >= {"fid", "num_images", "seconds"}
    # one split: the noise floor's 4 real images are taken out of the reference, which keeps the other 6
    assert result["num_images"] == 4 and result["num_reference_images"] == 6 and result["fid"] > 0
    assert result["noise_floor_images"] == 4 and result["noise_floor_split"] == "train"
