"""Sample quality offline: a feature network trained by `pipelines.features`, and `pipelines.evaluate` giving
FID, precision/recall, the noise floor, class accuracy, the protocol and ADM's .npz layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from conftest import tree_digest
from pipelines import Pipeline
from pipelines.evaluate import evaluate, frechet_distance, main as evaluate_main
from pipelines.feature_network import FeatureNetwork
from pipelines.features import train as train_features
from stage1_vqvae import VQVAE, VQVAEConfig
from stage2_prior import Prior, PriorConfig

FEATURE_FLAGS = ["--dataset", "digits", "--image-size", "16", "--width", "8", "--batch-size", "32", "--max-steps", "40",
                 "--eval-every", "20", "--save-every", "40", "--warmup-steps", "5", "--no-progress"]


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features") / "digits"
    metrics = train_features(["--output-dir", str(folder), *FEATURE_FLAGS])
    assert 0.5 < metrics["held_out_accuracy"] <= 1.0  # 40 steps already tell most digits apart
    return folder


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = VQVAE(VQVAEConfig(image_size=16, hidden_channels=8, latent_channels=4, num_res_blocks=1,
                                  codebook_size=16)).eval()
    prior = Prior.from_config(PriorConfig(vocab_size=16, latent_shape=(4, 4), num_classes=10, hidden_channels=8,
                                          num_layers=2))
    folder = tmp_path_factory.mktemp("pipeline") / "pipe"
    Pipeline(tokenizer, prior).save_pretrained(folder)
    return folder


def test_the_feature_network_is_a_pretrained_folder_with_its_accuracy(features_dir):
    network = FeatureNetwork.from_pretrained(features_dir)
    assert network.config.num_classes == 10 and network.config.image_size == 16
    features = network.features(torch.rand(5, 1, 16, 16) * 2 - 1)
    assert features.shape == (5, network.feature_size) and features.dtype == torch.float64
    metrics = json.loads((features_dir / "metrics.json").read_text())
    assert metrics["held_out_accuracy"] == metrics["accuracy"]


def test_evaluate_reports_fid_precision_recall_floor_and_accuracy_with_its_protocol(features_dir, pipeline_dir,
                                                                                     tmp_path):
    argv = ["--pipeline", str(pipeline_dir), "--dataset", "digits", "--split", "test", "--num-images", "24",
            "--features", str(features_dir), "--num-workers", "0", "--batch-size", "8", "--seed", "3",
            "--npz", str(tmp_path / "samples.npz"), "--output", str(tmp_path / "result.json"), "--no-progress"]
    result = evaluate(argv)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert result["fid"] > result["noise_floor_fid"] > 0  # an untrained pipeline against real digits, beside real ones
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1 and 0 <= result["class_accuracy"] <= 1
    assert result["num_reference_images"] == 180 and result["noise_floor_images"] == 24
    protocol = result["protocol"]
    assert protocol["features"]["sha256"] and protocol["samples"] == 24 and protocol["seed"] == 3
    assert protocol["sampling"]["temperature"] == 1.0 and len(protocol["prior_sha256"]) == 1
    batch = np.load(tmp_path / "samples.npz")["arr_0"]
    assert batch.shape == (24, 16, 16, 3) and batch.dtype == np.uint8  # ADM's evaluator layout
    again = [arg for arg in argv[:argv.index("--npz")]] + ["--no-progress"]
    assert evaluate(again)["fid"] == result["fid"]  # the same protocol, the same number


def test_a_noise_floor_from_the_reference_split_takes_its_rows_out_of_the_reference(features_dir, pipeline_dir):
    result = evaluate(["--pipeline", str(pipeline_dir), "--dataset", "digits", "--split", "test", "--num-images", "8",
                       "--features", str(features_dir), "--noise-floor-split", "test", "--num-workers", "0",
                       "--no-progress"])
    assert result["noise_floor_images"] == 8 and result["num_reference_images"] == 180 - 8  # never a shared row
    assert result["noise_floor_fid"] > 0


def test_fid_and_precision_recall_equal_the_formulas_computed_independently():
    from pipelines.evaluate import NEIGHBOURHOOD, prc_features_to_metric

    generator = torch.Generator().manual_seed(0)
    real = torch.randn(60, 6, generator=generator, dtype=torch.float64)
    fake = torch.randn(50, 6, generator=generator, dtype=torch.float64) * 1.3 + 0.4
    mean_real, mean_fake = real.mean(0).numpy(), fake.mean(0).numpy()
    cov_real, cov_fake = np.cov(real.numpy(), rowvar=False), np.cov(fake.numpy(), rowvar=False)
    expected = ((mean_real - mean_fake) ** 2).sum() + np.trace(cov_real + cov_fake - 2 * linalg.sqrtm(cov_real @ cov_fake).real)
    assert frechet_distance(fake, real) == pytest.approx(expected, rel=1e-6)
    # precision: the share of generated points inside some real point's k-NN ball (Kynkaanniemi et al. 2019, eq. 1-2)
    radii_real = torch.cdist(real, real).kthvalue(NEIGHBOURHOOD + 1, dim=1).values
    radii_fake = torch.cdist(fake, fake).kthvalue(NEIGHBOURHOOD + 1, dim=1).values
    precision = (torch.cdist(fake, real) <= radii_real[None]).any(1).double().mean().item()
    recall = (torch.cdist(real, fake) <= radii_fake[None]).any(1).double().mean().item()
    prc = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=NEIGHBOURHOOD, prc_batch_size=1000,
                                 save_cpu_ram=False, verbose=False)
    assert prc["precision"] == pytest.approx(precision) and prc["recall"] == pytest.approx(recall)
    assert 0 < precision < 1 and 0 < recall < 1


@pytest.mark.parametrize("extra, message", [
    (lambda w: ["--features", str(w["pipeline"] / "prior")], "holds a GatedPixelCNN, not a FeatureNetwork"),
    (lambda w: ["--features", str(w["tmp"] / "nothing")], "is neither 'inception' nor a folder"),
    (lambda w: ["--num-images", "1"], "--num-images must be at least 4"),
    (lambda w: ["--npz", str(w["tmp"] / "old.npz")], "already exists"),
    (lambda w: ["--method", "cached", "--window", "3"], "a window is a setting of method='jacobi'"),
])
def test_evaluate_bad_input(features_dir, pipeline_dir, tmp_path, capsys, extra, message):
    (tmp_path / "old.npz").write_bytes(b"earlier samples")
    where = {"pipeline": pipeline_dir, "tmp": tmp_path}
    argv = ["--pipeline", str(pipeline_dir), "--num-images", "4", "--features", str(features_dir), "--no-progress",
            *extra(where)]
    before = tree_digest(tmp_path)
    assert evaluate_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert tree_digest(tmp_path) == before
