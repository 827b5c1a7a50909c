"""shared/data/streaming.py: streamed training data (--streaming), tar shards, exact resume by skip."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TOKENIZER_FLAGS, run_module
from shared.data import Augmentation, DataConfig
from shared.data.streaming import Stream, StreamingConfig, expand_shards
from shared.errors import UserError


def write_shards(folder: Path, name: str, shards: int, per_shard: int, bad: set[int] = frozenset()) -> str:
    """Tar shards `name-000000.tar` ... of 16x16 grey images (value = sample number), a `.cls` label and a
    `.txt` caption each; samples in `bad` get bytes that are not an image. Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    number = 0
    for shard in range(shards):
        with tarfile.open(folder / f"{name}-{shard:06d}.tar", "w") as archive:
            for _ in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(np.full((16, 16), number % 256, dtype=np.uint8)).save(buffer, format="PNG")
                members = {"png": b"not a png" if number in bad else buffer.getvalue(),
                           "cls": str(number % 10).encode(), "txt": f"sample {number}".encode()}
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{number:08d}.{suffix}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
                number += 1
    return str(folder / f"{name}-{{000000..{shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return write_shards(root, "train", 4, 12), write_shards(root, "val", 1, 8)


def stream_of(pattern: str, validation: str, **settings) -> Stream:
    config = DataConfig(dataset=pattern, image_size=16)
    return Stream(config, StreamingConfig(streaming=True, validation_dataset=validation, **settings))


def sample_numbers(batch) -> list[int]:
    return batch.pixels[:, 0, 0, 0].tolist()  # each image is filled with its sample number


def test_expand_shards(tmp_path):
    pattern = write_shards(tmp_path, "train", 3, 1)
    files = [str(tmp_path / f"train-{index:06d}.tar") for index in range(3)]
    assert expand_shards(pattern) == files
    assert expand_shards(str(tmp_path / "train-*.tar")) == files
    assert expand_shards(str(tmp_path / "train-{000000,000002}.tar")) == [files[0], files[2]]
    with pytest.raises(UserError, match="matches no file .*train-000003.tar is missing"):
        expand_shards(str(tmp_path / "train-{000000..000003}.tar"))
    with pytest.raises(UserError, match="matches no file"):
        expand_shards(str(tmp_path / "val-*.tar"))


def test_stream_order_is_seeded_resumes_exactly_and_ignores_workers(shards):
    train, validation = shards
    stream = stream_of(train, validation, shuffle_buffer=16)
    channels = stream.first_channels(None)
    augmentation = Augmentation(seed=3, flip=True)

    def numbers(first: int, count: int, workers: int, world: int = 1, rank: int = 0) -> list[list[int]]:
        batches = stream.training_batches(channels, augmentation, 5, rank, world, first, workers, False)
        return [sample_numbers(next(batches)) for _ in range(count)]

    straight = numbers(0, 14, 0)  # 70 samples: past the first epoch of 48
    flat = [number for batch in straight for number in batch]
    assert sorted(flat[:48]) == list(range(48)) and flat[:48] != list(range(48))  # every sample, shuffled
    assert flat[48:] != flat[:22]  # the next epoch is shuffled anew
    assert numbers(0, 14, 0) == straight  # fixed by the seed
    for first in (1, 9, 10):  # a resumed run: mid-epoch, and across the epoch boundary
        assert numbers(first, 14 - first, 0) == straight[first:]
    assert numbers(7, 7, 2) == straight[7:]  # loader workers only decode: the same batches
    ranks = [[number for batch in numbers(0, 5, 0, world=2, rank=rank) for number in batch][:24] for rank in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(48))  # two processes split the shards: disjoint, every sample


def test_a_corrupt_member_is_replaced_in_its_batch_and_strict_stops(tmp_path):
    train = write_shards(tmp_path, "train", 2, 6, bad={3})
    validation = write_shards(tmp_path, "val", 1, 4)
    stream = stream_of(train, validation, shuffle_buffer=0)
    batches = stream.training_batches(1, Augmentation(), 6, 0, 1, 0, 0, False)
    first = next(batches)
    assert sample_numbers(first) == [0, 1, 2, 4, 4, 5]  # sample 3 is replaced by the next readable one
    assert len(first.problems) == 1 and "00000003" in first.problems[0]
    strict = Stream(DataConfig(dataset=train, image_size=16, strict_images=True),
                    StreamingConfig(streaming=True, validation_dataset=validation, shuffle_buffer=0))
    with pytest.raises(UserError, match="00000003"):
        next(strict.training_batches(1, Augmentation(), 6, 0, 1, 0, 0, False))


def test_streamed_training_resumes_bit_for_bit(shards, tmp_path):
    train, validation = shards
    flags = ["--dataset", train, "--streaming", "--validation-dataset", validation, "--shuffle-buffer", "16",
             "--max-steps", "6", "--save-every", "3", "--eval-every", "3", "--num-workers", "0",
             *TINY_TOKENIZER_FLAGS, "--batch-size", "4"]
    straight = tmp_path / "straight"
    result = run_module("stage1_vqvae.train", "--output-dir", str(straight), *flags)
    assert result.returncode == 0, result.stderr
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")  # as if killed after the checkpoint of step 3
    (resumed / "model.safetensors").unlink()
    result = run_module("stage1_vqvae.train", "--output-dir", str(resumed), "--resume", *flags)
    assert result.returncode == 0, result.stderr
    assert (straight / "model.safetensors").read_bytes() == (resumed / "model.safetensors").read_bytes()
    assert json.loads((straight / "train_config.json").read_text())["streaming"] is True


@pytest.mark.parametrize("extra, message", [
    ([], "has no held-out split, and a held-out fraction needs random access"),
    (["--validation-dataset", "VAL", "--cache-images", "always"], "--cache-images always needs the whole split"),
    (["--validation-dataset", "VAL", "--validation-fraction", "0.3"], "--validation-fraction holds rows out at random"),
])
def test_streaming_bad_input(shards, tmp_path, extra, message):
    train, validation = shards
    extra = [validation if flag == "VAL" else flag for flag in extra]
    result = run_module("stage1_vqvae.train", "--output-dir", str(tmp_path / "run"), "--dataset", train, "--streaming",
                        *extra, *TINY_TOKENIZER_FLAGS)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_shard_patterns_need_streaming_and_a_match(shards, tmp_path):
    train, _ = shards
    for argv, message in ((["--dataset", train], "add --streaming"),
                          (["--dataset", train.replace("000003", "000009"), "--streaming"], "matches no file")):
        result = run_module("stage1_vqvae.train", "--output-dir", str(tmp_path / "run"), *argv, *TINY_TOKENIZER_FLAGS)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    export = run_module("stage1_vqvae.export", "--tokenizer", "pixels:256", "--dataset", train, "--output",
                        str(tmp_path / "codes"))
    assert export.returncode == 2 and "tar shards" in export.stderr


def test_built_in_digits_stream_and_validate_on_their_test_split():
    stream = Stream(DataConfig(dataset="digits", image_size=16), StreamingConfig(streaming=True))
    validation = stream.validation_set(stream.first_channels(None))
    assert len(validation) == 180 and validation.has_labels  # digits' test split, all of it (< 1000)
    other = Stream(DataConfig(dataset="digits", image_size=16),
                   StreamingConfig(streaming=True, validation_dataset="digits", validation_images=50))
    chosen = other.validation_set(1)
    assert len(chosen) == 50 and torch.equal(chosen[0][0], validation[0][0])  # its held-out split, not its train split
    assert other.held_out_description == "digits"
    batch = next(stream.training_batches(1, Augmentation(), 8, 0, 1, 0, 0, False))
    assert batch.pixels.shape == (8, 1, 16, 16) and (batch.labels >= 0).all()
    assert torch.is_tensor(batch.indices)


def test_a_local_parquet_folder_streams(tmp_path):
    from shared.data.sources import _digits_splits

    folder = tmp_path / "parquet"
    folder.mkdir()
    for split, table in _digits_splits().items():
        table.select(range(40)).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    stream = Stream(DataConfig(dataset=str(folder), image_size=16), StreamingConfig(streaming=True))
    assert stream.label_column == "label" and len(stream.validation_set(stream.first_channels(None))) == 40
    batch = next(stream.training_batches(1, Augmentation(), 8, 0, 1, 0, 0, False))
    assert batch.pixels.shape == (8, 1, 16, 16)


@pytest.mark.parametrize("format", ["arrow", pytest.param("npy", marks=pytest.mark.slow)])
def test_streamed_export_equals_the_listed_export(tiny_tokenizer, tmp_path, format):
    from shared.codes import open_codes

    common = ["--tokenizer", str(tiny_tokenizer), "--split", "test", "--chunk-rows", "64", "--batch-size", "16",
              "--format", format, "--no-progress"]
    for name, extra in (("listed", []), ("streamed", ["--streaming"])):
        result = run_module("stage1_vqvae.export", *common, "--output", str(tmp_path / name), *extra)
        assert result.returncode == 0, result.stderr
    (listed, listed_meta), (streamed, streamed_meta) = (open_codes(tmp_path / name) for name in ("listed", "streamed"))
    assert streamed_meta.num_rows == listed_meta.num_rows == 180 and streamed_meta.has_labels
    assert streamed_meta.label_names == listed_meta.label_names
    assert torch.equal(streamed.codes, listed.codes) and torch.equal(streamed.labels, listed.labels)


def test_streamed_export_of_tar_shards(shards, tmp_path):
    train, _ = shards
    result = run_module("stage1_vqvae.export", "--tokenizer", "pixels:256", "--dataset", train, "--streaming",
                        "--image-size", "16", "--chunk-rows", "10", "--output", str(tmp_path / "codes"), "--no-progress")
    assert result.returncode == 0, result.stderr
    from shared.codes import open_codes

    codes, metadata = open_codes(tmp_path / "codes")
    assert metadata.num_rows == 48 and metadata.has_labels
    assert codes.codes[:, 0, 0].flatten().tolist() == list(range(48))  # source order: pixel value = sample number
    assert codes.labels.tolist() == [number % 10 for number in range(48)]
