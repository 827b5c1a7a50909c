"""shared/: strict configs, pretrained folders, every dataset form, batch order."""
from __future__ import annotations

import dataclasses

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image_folder
from shared.config import config_from_dict, config_to_dict
from shared.data import DataConfig, StepOrder, load_split, load_train_and_validation
from shared.errors import UserError
from stage1_vqvae import VQVAEConfig


def test_config_round_trip_and_unknown_key():
    config = VQVAEConfig(codebook_size=64, fsq_levels=(4, 4, 4))
    assert config_from_dict(VQVAEConfig, config_to_dict(config)) == config
    with pytest.raises(ValueError, match="unknown key 'codebok_size'"):
        config_from_dict(VQVAEConfig, {**config_to_dict(config), "codebok_size": 3})
    with pytest.raises(ValueError, match="'codebook_size' must be an integer"):
        config_from_dict(VQVAEConfig, {"codebook_size": "64"})


def test_digits_splits_are_fixed():
    train = load_split(DataConfig(dataset="digits", image_size=16), "train")
    test = load_split(DataConfig(dataset="digits", image_size=16), "test")
    assert (len(train), len(test)) == (1617, 180)
    image, label = train[0]
    assert image.shape == (1, 16, 16) and 0 <= label <= 9
    assert image.min() >= -1 and image.max() <= 1
    # the split is a function of the data alone: loading again gives the same rows
    again = load_split(DataConfig(dataset="digits", image_size=16), "test")
    assert torch.equal(again[5][0], test[5][0])
    assert sorted(set(test.labels.tolist())) == list(range(10))  # a seeded shuffle, not the first 180 rows


def test_image_folder_with_class_subfolders(tmp_path):
    root = write_image_folder(tmp_path / "photos", {"cat": 3, "dog": 5})
    train, validation = load_train_and_validation(DataConfig(dataset=str(root), image_size=8, validation_fraction=0.25))
    assert train.source.label_names == ["cat", "dog"]
    assert len(train) + len(validation) == 8 and len(validation) == 2
    image, label = train[0]
    assert image.shape == (3, 8, 8) and label in (0, 1)
    assert train.channels == 3  # inferred from the first image


def test_save_to_disk_folder(tmp_path):
    images = [Image.fromarray(np.full((10, 12), value, dtype=np.uint8)) for value in (0, 128, 255)]
    table = datasets.Dataset.from_dict({"picture": images, "kind": [0, 1, 1]},
                                       features=datasets.Features({"picture": datasets.Image(),
                                                                   "kind": datasets.Value("int64")}))
    table.save_to_disk(str(tmp_path / "saved"))
    dataset = load_split(DataConfig(dataset=str(tmp_path / "saved"), image_size=8, label_column="kind"))
    assert len(dataset) == 3 and dataset.channels == 1
    image, label = dataset[2]
    assert label == 1 and torch.allclose(image, torch.ones(1, 8, 8))


def test_resize_center_crop_keeps_aspect(tmp_path):
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, 10:30] = 255  # a white band in the centre 20 columns
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    (tmp_path / "a").mkdir()
    (tmp_path / "wide.png").rename(tmp_path / "a" / "wide.png")
    image, _ = load_split(DataConfig(dataset=str(tmp_path), image_size=10))[0]
    assert image.shape == (1, 10, 10)
    assert image[0, :, 2:8].min() > 0.9  # the centre crop is the white band


@pytest.mark.parametrize("bad, message", [
    ("/nonexistent/folder", "does not exist"),
    ("./not/here", "does not exist"),
])
def test_missing_dataset(bad, message):
    with pytest.raises(UserError, match=message):
        load_split(DataConfig(dataset=bad))


def test_corrupt_image_names_row_and_file(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 2})
    (root / "a" / "1.png").write_bytes(b"not a png at all")
    dataset = load_split(DataConfig(dataset=str(root), image_size=8, channels=3))
    with pytest.raises(UserError, match=r"cannot read the image at row \d .*1\.png"):
        [dataset[i] for i in range(len(dataset))]


def test_channel_mismatch_is_refused_at_the_first_image(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 2}, mode="RGB")
    with pytest.raises(UserError, match="has 3 channels, expected 1; pass --channels 3"):
        load_split(DataConfig(dataset=str(root), image_size=8, channels=1))


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        load_split(DataConfig(dataset=str(tmp_path / "empty")))


def test_step_order_is_a_function_of_seed_and_step():
    order = StepOrder(num_examples=10, batch_size=4, seed=3)
    first = [order.indices(k) for k in range(5)]
    again = StepOrder(num_examples=10, batch_size=4, seed=3)
    assert all(torch.equal(again.indices(k), first[k]) for k in reversed(range(5)))  # any order of access
    # every epoch is a permutation: 20 consecutive positions cover each example twice
    assert torch.bincount(torch.cat(first), minlength=10).tolist() == [2] * 10
    # two processes split each global batch without overlap
    rank0, rank1 = StepOrder(10, 2, 3, rank=0, world_size=2), StepOrder(10, 2, 3, rank=1, world_size=2)
    assert sorted(torch.cat([rank0.indices(0), rank1.indices(0)]).tolist()) == sorted(first[0].tolist())


def test_frozen_configs():
    with pytest.raises(dataclasses.FrozenInstanceError):
        VQVAEConfig().codebook_size = 3


@pytest.mark.parametrize("module", ["stage1_vqvae.train", "stage2_prior.train"])
def test_every_training_flag_has_help(module):
    import importlib

    parser = importlib.import_module(module).parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and not action.help.startswith(" (default"), f"{action.option_strings} has no help"
