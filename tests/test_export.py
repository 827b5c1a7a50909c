"""Code-grid export: exactness, formats, metadata checks, multi-process equality, kill-and-rerun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, run_torchrun
from shared.codes import open_codes
from shared.data import DataConfig, load_split
from stage1_vqvae import VQVAE
from stage1_vqvae.export import export


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    export(["--tokenizer", str(tiny_tokenizer), "--output", str(root / "arrow"), "--no-progress", "--chunk-rows", "500"])
    return root / "arrow"


def test_codes_equal_encode_of_preprocessed_images(exported, tiny_tokenizer):
    codes, metadata = open_codes(exported, tiny_tokenizer)
    tokenizer = VQVAE.from_pretrained(tiny_tokenizer)
    source = load_split(DataConfig(dataset="digits", split="train", image_size=16, channels=1))
    rows = torch.randperm(len(source), generator=torch.Generator().manual_seed(0))[:40]
    images = torch.stack([source[int(row)][0] for row in rows])
    expected = tokenizer.encode(images)
    stored, labels = codes[rows]
    assert torch.equal(stored, expected)
    assert labels.tolist() == [source[int(row)][1] for row in rows]
    assert metadata.num_rows == 1617 and metadata.latent_shape == (4, 4) and metadata.dtype == "int16"
    assert metadata.label_names == [str(d) for d in range(10)] and metadata.vocab_size == 32


def test_npy_format_matches_arrow(exported, tiny_tokenizer, tmp_path):
    export(["--tokenizer", str(tiny_tokenizer), "--output", str(tmp_path / "npy"), "--format", "npy", "--no-progress"])
    assert np.load(tmp_path / "npy" / "codes.npy").dtype == np.int16
    arrow_codes, _ = open_codes(exported)
    npy_codes, meta = open_codes(tmp_path / "npy")
    assert meta.format == "npy"
    assert torch.equal(arrow_codes.codes, npy_codes.codes) and torch.equal(arrow_codes.labels, npy_codes.labels)


def test_source_index_column(exported):
    import datasets

    table = datasets.load_from_disk(str(exported))
    assert table["source_index"][:5] == [0, 1, 2, 3, 4] and table.column_names == ["codes", "source_index", "label"]


def test_metadata_disagreeing_with_data(exported, tmp_path):
    import shutil

    shutil.copytree(exported, tmp_path / "edited")
    meta = json.loads((tmp_path / "edited" / "codes.json").read_text())
    meta["num_rows"] = 99
    (tmp_path / "edited" / "codes.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="says 99 rows, the data has 1617"):
        open_codes(tmp_path / "edited")
    meta["num_rows"], meta["latent_shape"] = 1617, [8, 8]
    (tmp_path / "edited" / "codes.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"grids are \(4, 4\)"):
        open_codes(tmp_path / "edited")


def test_tokenizer_hash_mismatch(exported, tmp_path):
    from stage1_vqvae import VQVAEConfig

    VQVAE(VQVAEConfig(image_size=16, codebook_size=32)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="made by another tokenizer"):
        open_codes(exported, tmp_path / "other")


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["listed", "streamed"])
def test_two_processes_give_the_same_bytes(exported, tiny_tokenizer, tmp_path, streaming):
    result = run_torchrun("stage1_vqvae.export", "--tokenizer", str(tiny_tokenizer), "--output",
                          str(tmp_path / "two"), "--no-progress", "--chunk-rows", "500", *streaming)
    assert result.returncode == 0, result.stderr[-3000:]
    data_files = sorted(path.name for path in exported.glob("*.arrow"))
    assert data_files and data_files == sorted(path.name for path in (tmp_path / "two").glob("*.arrow"))
    for name in [*data_files, "codes.json"]:
        assert (exported / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["listed", "streamed"])
def test_killed_export_leaves_no_output_and_rerun_finishes(tiny_tokenizer, exported, tmp_path, streaming):
    output = tmp_path / "codes"
    command = [sys.executable, "-m", "stage1_vqvae.export", "--tokenizer", str(tiny_tokenizer), "--output", str(output),
               "--no-progress", "--chunk-rows", "100", "--batch-size", "50", *streaming]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / ".codes.partial"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(staging.glob("rows_*.npz"))) < 3:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not output.exists(), "a killed export must not leave an output that looks complete"
    done_before = sorted(staging.glob("rows_*.npz"))
    assert 3 <= len(done_before) < 17
    done_before[1].write_bytes(b"")  # what a power cut can leave: an empty chunk is encoded again
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not staging.exists()
    assert torch.equal(open_codes(output)[0].codes, open_codes(exported)[0].codes)


