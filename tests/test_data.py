"""The data path at scale: workers, exact batches, augmentation, unlabelled splits, image modes,
corrupt images, small validation sets, memory-mapped codes, and the run-folder rules around them."""
from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TOKENIZER_FLAGS, write_image_folder
from shared.codes import open_codes
from shared.data import (Augmentation, CachedImages, DataConfig, StepOrder, load_split, load_train_and_validation,
                         training_batches)
from shared.training import LoopConfig, ScheduleExtension, learning_rate_at
from stage1_vqvae.evaluate import evaluate
from stage1_vqvae.export import export
from stage1_vqvae.train import train

RUN = ["--max-steps", "2", "--eval-every", "2", "--save-every", "2", *TINY_TOKENIZER_FLAGS]
# the tiny model without its batch size and progress flags
TINY_MODEL = ["--image-size", "16", "--hidden-channels", "16", "--latent-channels", "8", "--num-res-blocks", "1",
              "--codebook-size", "32", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("colour") / "photos", {"cat": 20, "dog": 20}, size=(20, 24))


def augmented(folder, **flags) -> tuple:
    config = DataConfig(dataset=str(folder), image_size=16, random_flip=True, random_crop=True, **flags)
    return load_train_and_validation(config, augmentation=Augmentation(seed=3, flip=True, crop=True))


def test_batches_are_a_function_of_seed_and_step_with_workers(colour_folder):
    train_set, _ = augmented(colour_folder)
    order = StepOrder(len(train_set), 8, seed=3)
    from_start = training_batches(train_set, order, 0, num_workers=2, pin_memory=False)
    first_six = [next(from_start) for _ in range(6)]
    resumed = training_batches(train_set, order, 4, num_workers=0, pin_memory=False)
    for expected in first_six[4:]:
        batch = next(resumed)
        assert torch.equal(batch.indices, expected.indices) and torch.equal(batch.pixels, expected.pixels)
    # flips and crops really happen, and the cache gives the very same pixels
    assert not torch.equal(first_six[0].pixels, load_split(DataConfig(dataset=str(colour_folder), image_size=16))
                           [0][0].add(1).mul(127.5).round().byte().expand_as(first_six[0].pixels))
    cached = training_batches(CachedImages(train_set, num_workers=2), order, 0, num_workers=0, pin_memory=False)
    for expected in first_six:
        assert torch.equal(next(cached).pixels, expected.pixels)


def test_the_cache_gives_the_streamed_batches_with_a_corrupt_row_and_its_substitute_label(tmp_path):
    """A corrupt image is replaced by the next readable row, pixels and label both, whether the split is
    streamed or decoded into memory once."""
    root = write_image_folder(tmp_path / "photos", {"cat": 6, "dog": 6}, size=(20, 24))
    (root / "cat" / "5.png").write_bytes(b"\x89PNG truncated")  # the last cat: its substitute is the first dog
    train_set = load_split(DataConfig(dataset=str(root), image_size=16))
    bad = [i for i in range(len(train_set)) if train_set.rows.path(i).name == "5.png"][0]
    assert train_set.labels[bad] == 0 and train_set.labels[bad + 1] == 1
    order = StepOrder(len(train_set), 12, seed=1)  # one batch holds every row
    streamed = next(training_batches(train_set, order, 0, num_workers=0, pin_memory=False))
    cached = next(training_batches(CachedImages(train_set, num_workers=0), order, 0, num_workers=0, pin_memory=False))
    assert torch.equal(cached.indices, streamed.indices) and torch.equal(cached.pixels, streamed.pixels)
    assert torch.equal(cached.labels, streamed.labels)
    where = (streamed.indices == bad).nonzero()[0, 0]
    assert streamed.labels[where] == 1 and cached.labels[where] == 1  # the substitute's label, both ways
    assert len(streamed.problems) == 1


def test_two_processes_read_disjoint_examples_with_workers(colour_folder):
    train_set, _ = augmented(colour_folder)
    ranks = [training_batches(train_set, StepOrder(len(train_set), 4, 5, rank, 2), 0, 2, False) for rank in (0, 1)]
    seen = []
    for _ in range(4):
        zero, one = next(ranks[0]), next(ranks[1])
        assert not set(zero.indices.tolist()) & set(one.indices.tolist())
        seen += zero.indices.tolist() + one.indices.tolist()
    assert sorted(seen) == sorted(StepOrder(len(train_set), 8, 5).indices(k).tolist()[i] for k in range(4)
                                  for i in range(8))


def test_sixteen_bit_ramp_keeps_its_values(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535 in 8-bit steps
    (tmp_path / "ramp" / "a").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "ramp" / "a" / "ramp.png")
    assert Image.open(tmp_path / "ramp" / "a" / "ramp.png").mode.startswith("I")
    image, _ = load_split(DataConfig(dataset=str(tmp_path / "ramp"), image_size=16))[0]
    assert torch.equal(image.add(1).mul(127.5).round().long()[0], torch.arange(256).view(16, 16))


@pytest.mark.parametrize("mode", ["P", "RGBA", "CMYK", "LA"])
def test_other_modes_convert(tmp_path, mode):
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[..., 0], pixels[..., 3] = 200, 255  # opaque red
    pixels[:, 4:, 3] = 0  # transparent right half: composited onto white
    image = Image.fromarray(pixels, "RGBA")
    converted = {"P": image.convert("RGB").convert("P", palette=Image.ADAPTIVE), "RGBA": image, "CMYK": image.convert("RGB").convert("CMYK"),
                 "LA": image.convert("LA")}[mode]
    (tmp_path / "m" / "a").mkdir(parents=True)
    converted.save(tmp_path / "m" / "a" / ("x.tif" if mode == "CMYK" else "x.png"))
    dataset = load_split(DataConfig(dataset=str(tmp_path / "m"), image_size=8))
    values = dataset[0][0].add(1).mul(127.5).round()
    assert dataset.channels == (1 if mode == "LA" else 3)
    if mode in ("RGBA", "LA"):
        assert values[:, :, 4:].min() == 255  # white where it was transparent
    if mode != "LA":
        assert abs(values[0, 0, 0].item() - 200) <= 2 and values[1:, 0, 0].max() <= 2


def test_corrupt_image_is_skipped_counted_and_strict_stops(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_image_folder(root / "train", {"a": 12}, mode="L")
    write_image_folder(root / "test", {"a": 3}, mode="L", seed=1)
    (root / "train" / "a" / "4.png").write_bytes(b"\x89PNG truncated")
    dataset = load_split(DataConfig(dataset=str(root), image_size=16))
    bad = [i for i in range(len(dataset)) if dataset.rows.path(i).name == "4.png"][0]
    substitute = dataset.example(bad)
    assert substitute.problem and "4.png" in substitute.problem
    assert torch.equal(substitute.pixels, dataset.example(bad + 1).pixels)  # the next readable row, every time
    flags = ["--dataset", str(root), "--cache-images", "never", "--num-workers", "2", "--batch-size", "12",
             "--max-steps", "3", "--eval-every", "3", "--save-every", "3", "--no-progress", *TINY_MODEL]
    metrics = train(["--output-dir", str(tmp_path / "run"), *flags])
    assert metrics["corrupt_images"] == 1
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["corrupt_image_count"] == 1 and "4.png" in state["corrupt_images"][0]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "4.png" in line]
    assert len(warnings) == 1  # reported once, though the image is met on every epoch
    from stage1_vqvae.train import main
    assert main(["--output-dir", str(tmp_path / "strict"), "--strict-images", *flags]) == 2
    assert "4.png" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "strict").exists()  # it failed before its first checkpoint: nothing is left


def saved_splits(root, test_labels) -> str:
    rng = np.random.default_rng(0)
    images = lambda n: [Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)) for _ in range(n)]
    label = datasets.ClassLabel(names=["x", "y"])
    train_split = datasets.Dataset.from_dict({"image": images(24), "label": [0, 1] * 12},
                                             features=datasets.Features({"image": datasets.Image(), "label": label}))
    if test_labels is None:  # no label column at all
        test_split = datasets.Dataset.from_dict({"image": images(6)},
                                                features=datasets.Features({"image": datasets.Image()}))
    else:
        test_split = datasets.Dataset.from_dict({"image": images(6), "label": test_labels},
                                                features=datasets.Features({"image": datasets.Image(), "label": label}))
    datasets.DatasetDict({"train": train_split, "test": test_split}).save_to_disk(str(root))
    return str(root)


@pytest.mark.parametrize("test_labels", [None, [-1] * 6], ids=["no label column", "labels -1"])
def test_unlabelled_test_split_through_train_export_evaluate(tmp_path, test_labels):
    source = saved_splits(tmp_path / "saved", test_labels)
    train(["--dataset", source, "--output-dir", str(tmp_path / "tok"), "--no-progress", *RUN])
    export(["--tokenizer", str(tmp_path / "tok"), "--dataset", source, "--split", "test", "--output",
            str(tmp_path / "codes"), "--no-progress"])
    codes, metadata = open_codes(tmp_path / "codes")
    assert len(codes) == 6 and not metadata.has_labels
    result = evaluate(["--tokenizer", str(tmp_path / "tok"), "--dataset", source, "--split", "test"])
    assert result["num_images"] == 6
    # labels off altogether
    export(["--tokenizer", str(tmp_path / "tok"), "--dataset", source, "--label-column", "none", "--output",
            str(tmp_path / "codes_nolabel"), "--no-progress"])
    assert not open_codes(tmp_path / "codes_nolabel")[1].has_labels


@pytest.mark.parametrize("num_validation", [1, 7])
def test_small_validation_sets(tmp_path, num_validation):
    root = tmp_path / "data"
    write_image_folder(root / "train", {"a": 10}, mode="L")
    write_image_folder(root / "test", {"a": num_validation}, mode="L", seed=1)
    metrics = train(["--dataset", str(root), "--output-dir", str(tmp_path / "run"), "--no-progress", *RUN])
    assert metrics["psnr"] > 0
    assert (tmp_path / "run" / "samples" / "reconstructions_00000002.png").is_file()


def test_codes_stay_int16_until_the_embedding(tiny_tokenizer, tmp_path, monkeypatch):
    from shared.data import code_batches
    from stage2_prior.train import train as train_prior

    export(["--tokenizer", str(tiny_tokenizer), "--output", str(tmp_path / "codes"), "--no-progress"])
    codes, _ = open_codes(tmp_path / "codes")
    column = codes.grids["codes"].parts[0]
    assert isinstance(column, np.ndarray) and not column.flags.owndata  # a view of the mapped file
    grids, labels = next(code_batches(codes, StepOrder(len(codes), 8, 0), 0, num_workers=2, pin_memory=False))
    assert grids.dtype == torch.int16 and grids.shape == (8, 4, 4) and labels.dtype == torch.int64
    seen = []
    from stage2_prior import Prior

    import stage2_prior.train

    monkeypatch.setattr(stage2_prior.train, "sample_grid", lambda *args, **kwargs: None)  # sampling makes int64 grids
    original = Prior.embed
    Prior.embed = lambda self, codes: seen.append(codes.dtype) or original(self, codes)
    try:
        train_prior(["--codes", str(tmp_path / "codes"), "--output-dir", str(tmp_path / "prior"), "--max-steps", "2",
                     "--hidden-channels", "8", "--num-layers", "2", "--num-workers", "1", "--no-progress"])
    finally:
        Prior.embed = original
    assert seen and set(seen) == {torch.int16}  # training and validation batches reach the embedding as stored


def test_learning_rate_continues_when_max_steps_grows():
    old = LoopConfig(output_dir="x", max_steps=1000, learning_rate=2e-3, warmup_steps=50)
    new = LoopConfig(output_dir="x", max_steps=2000, learning_rate=2e-3, warmup_steps=50)
    for step in (600, 1000):  # extended mid-run, or after the run had ended
        extension = ScheduleExtension(step, learning_rate_at(old, step))
        before, after = learning_rate_at(old, step - 1), learning_rate_at(new, step, extension)
        assert after == pytest.approx(learning_rate_at(old, step)) and after <= before
        assert learning_rate_at(new, 2000, extension) == pytest.approx(2e-4)
        steps = [learning_rate_at(new, s, extension) for s in range(step, 2001)]
        assert max(abs(a - b) for a, b in zip(steps, steps[1:])) < 1e-5  # no jump anywhere
    assert learning_rate_at(new, 1000) / learning_rate_at(old, 999) > 5  # what an unextended schedule would do


def test_resume_with_more_steps_records_the_extension(tmp_path, capsys):
    flags = ["--output-dir", str(tmp_path / "run"), "--eval-every", "100", "--save-every", "4", *TINY_MODEL,
             "--no-progress"]
    train([*flags, "--max-steps", "4"])
    train([*flags, "--max-steps", "8", "--resume"])
    assert "the learning rate continues from" in capsys.readouterr().err
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["extension"]["step"] == 4 and state["max_steps"] == 8


def test_overwrite_clears_the_old_run_and_out_of_memory_leaves_it(tmp_path):
    from stage1_vqvae.train import main

    output = tmp_path / "run"
    train(["--output-dir", str(output), "--max-steps", "4", "--eval-every", "2", "--save-every", "4",
           "--no-progress", *TINY_TOKENIZER_FLAGS])
    before = {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    # a run that cannot take its first step restores what --overwrite had moved aside
    assert main(["--output-dir", str(output), "--overwrite", "--batch-size", "100000", "--max-steps", "2",
                 "--no-progress"]) == 2
    assert {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()} == before
    train(["--output-dir", str(output), "--overwrite", "--max-steps", "3", "--eval-every", "3", "--save-every", "3",
           "--no-progress", *TINY_TOKENIZER_FLAGS])
    samples = sorted(path.name for path in (output / "samples").iterdir())
    assert samples == ["reconstructions_00000003.png"]  # the old run's grids are gone
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["step_00000003"]
    assert not (output / ".replaced").exists()


def test_generate_over_an_earlier_larger_run_leaves_no_stale_images(tmp_path):
    from pipelines import Pipeline
    from pipelines.generate import generate
    from stage1_vqvae import VQVAE, VQVAEConfig
    from stage2_prior import GatedPixelCNN, PriorConfig

    tokenizer = VQVAE(VQVAEConfig(image_size=16, hidden_channels=4, latent_channels=4, num_res_blocks=1,
                                  codebook_size=8))
    prior = GatedPixelCNN(PriorConfig(vocab_size=8, latent_shape=(4, 4), hidden_channels=4, num_layers=1))
    Pipeline(tokenizer, prior).save_pretrained(tmp_path / "pipe")
    common = ["--pipeline", str(tmp_path / "pipe"), "--output-dir", str(tmp_path / "out"), "--no-progress"]
    generate([*common, "--num-images", "5"])
    generate([*common, "--num-images", "2", "--overwrite"])
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["codes.npy", "grid.png", "image_00000.png",
                                                                          "image_00001.png"]


def test_an_image_folder_is_listed_once(tmp_path, monkeypatch):
    import os

    root = tmp_path / "tree"
    write_image_folder(root / "train", {"a": 3, "b": 2}, mode="L")
    write_image_folder(root / "test", {"a": 1, "b": 1}, mode="L")
    listed = []
    original = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listed.append(str(path)) or original(path))
    from shared.data import open_source

    source = open_source(DataConfig(dataset=str(root)))
    source.first_image_value("train")
    rows = source.rows("train"), source.rows("test")
    assert [len(split) for split in rows] == [5, 2] and source.label_names == ["a", "b"]
    assert sorted(listed) == sorted(set(listed)) and len(listed) == 7  # root, 2 splits, 4 class folders: once each
