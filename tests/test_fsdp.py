"""--fsdp (shared/training/sharding.py): FSDP2 on CPU over gloo, against data-parallel runs of the same settings."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_TOKENIZER_FLAGS, run_module, run_torchrun
from stage1_vqvae import VQVAE
from stage2_prior import Prior

# A VQGAN with the EMA codebook, validated and checkpointed at steps 3 and 6; its discriminator starts at step 4,
# after the first checkpoint (whose optimizer for it has no state yet).
GAN_FLAGS = [*TINY_TOKENIZER_FLAGS, "--batch-size", "16", "--max-steps", "6", "--save-every", "3", "--eval-every", "3",
             "--num-workers", "0", "--discriminator-weight", "0.5", "--discriminator-start", "4",
             "--discriminator-layers", "2", "--report-to", "tensorboard", "--log-every", "1"]


def losses(run: Path) -> list[float]:
    events = EventAccumulator(str(next((run / "logs").rglob("events.out.*")).parent))
    events.Reload()
    return [event.value for event in events.Scalars("train/loss")]


def max_difference(first: Path, second: Path) -> float:
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[name].double() - b[name].double()).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def gan_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    for name, extra in (("fsdp", ["--fsdp"]), ("ddp", [])):
        result = run_torchrun("stage1_vqvae.train", "--output-dir", str(root / name), *GAN_FLAGS, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_sharded_vqgan_trains_as_data_parallel_and_saves_the_full_model(gan_runs):
    sharded, replicated = gan_runs / "fsdp", gan_runs / "ddp"
    assert losses(sharded) == pytest.approx(losses(replicated), rel=1e-5, abs=1e-6) and len(losses(sharded)) == 6
    assert max_difference(sharded, replicated) < 1e-5
    # the checkpoint is sharded: each process wrote its part, and .metadata names them
    checkpoint = sharded / "checkpoints" / "step_00000006"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {path.name for path in checkpoint.iterdir()}
    # the saved model is whole: it loads in one process and encodes as the data-parallel model does
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    codes = [VQVAE.from_pretrained(run).encode(images) for run in (sharded, replicated)]
    assert torch.equal(*codes)


def test_sharded_run_resumes_bit_for_bit(gan_runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(gan_runs / "fsdp", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")  # as if killed after the checkpoint of step 3
    (resumed / "model.safetensors").unlink()
    shutil.rmtree(resumed / "logs")
    result = run_torchrun("stage1_vqvae.train", "--output-dir", str(resumed), "--resume", "--fsdp", *GAN_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert (resumed / "model.safetensors").read_bytes() == (gan_runs / "fsdp" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", ["transformer", "pixelcnn"])  # pixelcnn: causal masks are non-persistent buffers
def test_sharded_prior_samples_the_data_parallel_codes(tiny_tokenizer, tmp_path, arch):
    from stage1_vqvae.export import export

    export(["--tokenizer", str(tiny_tokenizer), "--output", str(tmp_path / "codes"), "--no-progress"])
    flags = ["--codes", str(tmp_path / "codes"), "--arch", arch, "--max-steps", "4", "--save-every", "4",
             "--eval-every", "2", "--sample-every", "4", "--hidden-channels", "16", "--num-layers", "2",
             "--batch-size", "8", "--gradient-accumulation-steps", "2", "--no-progress"]
    for name, extra in (("fsdp", ["--fsdp"]), ("ddp", [])):
        result = run_torchrun("stage2_prior.train", "--output-dir", str(tmp_path / name), *flags, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "warning" not in result.stderr.lower().replace("userwarning", "")
    assert max_difference(tmp_path / "fsdp", tmp_path / "ddp") < 1e-5
    sharded, replicated = (Prior.from_pretrained(tmp_path / name) for name in ("fsdp", "ddp"))
    labels = torch.arange(8) % 10
    assert torch.equal(sharded.sample(8, labels=labels, seed=1), replicated.sample(8, labels=labels, seed=1))
    grids = [(tmp_path / name / "samples" / "samples_00000004.png").read_bytes() for name in ("fsdp", "ddp")]
    assert grids[0] == grids[1]  # the sample grid written during training, from the gathered weights


def test_fsdp_bad_input(gan_runs, tmp_path):
    plugin = run_module("stage1_vqvae.train", "--output-dir", str(tmp_path / "plugin"), *TINY_TOKENIZER_FLAGS,
                        env={"ACCELERATE_USE_FSDP": "true"})
    assert plugin.returncode == 2 and "pass --fsdp" in plugin.stderr
    alone = run_module("stage1_vqvae.train", "--output-dir", str(tmp_path / "alone"), "--fsdp", *TINY_TOKENIZER_FLAGS)
    assert alone.returncode == 2 and "launch it with torchrun" in alone.stderr and not (tmp_path / "alone").exists()
    fp16 = run_module("stage1_vqvae.train", "--output-dir", str(tmp_path / "fp16"), "--fsdp", "--mixed-precision",
                      "fp16", *TINY_TOKENIZER_FLAGS)
    assert fp16.returncode == 2 and "bf16" in fp16.stderr
    other_count = tmp_path / "other"
    shutil.copytree(gan_runs / "fsdp", other_count)
    result = run_torchrun("stage1_vqvae.train", "--output-dir", str(other_count), "--resume", "--fsdp", *GAN_FLAGS,
                          nproc=3)
    assert result.returncode != 0 and "written by 2 process(es)" in result.stderr and "dcp_to_torch_save" in result.stderr
