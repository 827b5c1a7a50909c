"""Folders saved by the release before the redesign (tests/fixtures/release1) still load, and give the codes,
log-probabilities and images that release gave for the same seeds."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.numpy import save

from pipelines import Pipeline
from shared.codes import open_codes
from stage1_vqvae import load_tokenizer
from stage2_prior import Prior

FIXTURES = Path(__file__).parent / "fixtures" / "release1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The release's folders as it saved them: a copy of the fixture tree with each model.safetensors written
    back from its weights.json (the fixture keeps weights as text, no binary data), byte for byte: the sha256
    the release recorded is checked, since priors and pipelines name their tokenizer by it."""
    root = tmp_path_factory.mktemp("release1") / "release1"
    shutil.copytree(FIXTURES, root)
    for text in root.rglob("weights.json"):
        values = json.loads(text.read_text())
        arrays = {name: np.array(entry["values"].split(), dtype=entry["dtype"]).reshape(entry["shape"])
                  for name, entry in values["tensors"].items()}
        weights = save(arrays, metadata=values["metadata"])
        assert hashlib.sha256(weights).hexdigest() == values["sha256"], text
        (text.parent / "model.safetensors").write_bytes(weights)
    return root


def tensor(values) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values)


@pytest.mark.parametrize("name", sorted(EXPECTED["priors"]))
def test_every_saved_prior_samples_the_same_codes(name, saved):
    expected = EXPECTED["priors"][name]
    prior = Prior.from_pretrained(saved / "priors" / name)
    labels, condition = tensor(expected["labels"]), tensor(expected["condition"])
    codes = prior.sample(3, labels=labels, seed=11, condition=condition)
    assert codes.tolist() == expected["codes"]
    assert prior.sample(3, labels=labels, seed=11, condition=condition, method="naive").tolist() == expected["naive_codes"]
    # the mixture's bin centres were float32 in a float64 model then (a defect): they differ by about 1e-5 nats
    tolerance = 1e-3 if prior.config.head == "logistic_mixture" else 1e-9
    assert prior.log_prob(codes, labels, condition).tolist() == pytest.approx(expected["log_prob"], abs=tolerance)
    if "guided_codes" in expected:
        assert prior.sample(3, labels=labels, seed=11, guidance_scale=2.0).tolist() == expected["guided_codes"]


def test_a_saved_pixelsnail_keeps_the_network_it_was_trained_with(saved):
    prior = Prior.from_pretrained(saved / "priors" / "pixelsnail_stack")
    assert prior.config.options.full_context is False and prior.previous_codes is None


@pytest.mark.parametrize("name", sorted(EXPECTED["tokenizers"]))
def test_every_saved_tokenizer_encodes_and_decodes_the_same(name, saved):
    expected = EXPECTED["tokenizers"][name]
    tokenizer = load_tokenizer(saved / "tokenizers" / name)
    torch.manual_seed(expected["images_seed"])
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    codes = tokenizer.encode(images)  # every quantizer: vq (one and two levels), fsq, rvq, lfq, simvq
    as_lists = {key: value.tolist() for key, value in codes.items()} if isinstance(codes, dict) else codes.tolist()
    assert as_lists == expected["codes"]
    with torch.no_grad():
        assert tokenizer.decode(codes).double().sum().item() == pytest.approx(expected["decoded_sum"], abs=1e-4)


def test_saved_pixel_tokenizer_encodes_and_decodes_the_same(saved):
    expected = EXPECTED["pixels"]
    tokenizer = load_tokenizer(saved / "tokenizers" / "pixels")
    torch.manual_seed(expected["images_seed"])
    images = torch.rand(2, 3, 3, 3) * 2 - 1
    codes = tokenizer.encode(images)
    assert codes.tolist() == expected["codes"] and tokenizer.decode(codes).tolist() == expected["decoded"]


def test_saved_pipeline_generates_the_same_images(saved):
    expected = EXPECTED["pipelines"]["pipeline"]
    pipeline = Pipeline.from_pretrained(saved / "pipeline", device="cpu")
    out = pipeline.generate(4, labels=expected["labels"], seed=expected["seed"], output_type="pt", progress=False)
    assert out.codes.tolist() == expected["codes"]
    assert out.images.double().sum().item() == pytest.approx(expected["images_sum"], abs=1e-4)


def rebuild_code_export(name: str, folder: Path) -> Path:
    """The release's export `name` in `folder`: its codes.json as saved, its data files written from the values
    it held (kept as text in the fixture, which holds no binary data): a `datasets` folder (format 1) or one
    `.npy` per column (format 2, `--format npy`)."""
    folder.mkdir()
    shutil.copy(FIXTURES / name / "codes.json", folder / "codes.json")
    if (FIXTURES / name / "rows.json").exists():
        rows = json.loads((FIXTURES / name / "rows.json").read_text())
        features = datasets.Features.from_dict(rows["features"])
        staged = folder.parent / f"{name}.data"
        datasets.Dataset.from_dict(rows["columns"], features=features).save_to_disk(str(staged))
        for path in staged.iterdir():
            shutil.move(str(path), folder / path.name)
    else:
        for column, array in json.loads((FIXTURES / name / "arrays.json").read_text()).items():
            np.save(folder / f"{column}.npy", np.array(array["values"], dtype=array["dtype"]))
    return folder


@pytest.mark.parametrize("name", ["codes_format1", "codes_format2"])
def test_saved_code_exports_read_back(name, tmp_path):
    expected = EXPECTED["codes"][name]
    dataset, metadata = open_codes(rebuild_code_export(name, tmp_path / name))
    if len(metadata.levels) > 1:
        grids = {level: dataset.level_view(level)[:][0].tolist() for level in metadata.level_names}
    else:
        grids = dataset[:][0].tolist()
    assert grids == expected["codes"] and dataset[:][1].tolist() == expected["labels"]
