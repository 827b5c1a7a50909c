"""Never lose a run: kill real training processes, corrupt checkpoints, and resume bit for bit."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_TOKENIZER_FLAGS, run_module
from shared.pretrained import load_weights

STAGE1 = ["stage1_vqvae.train", "--max-steps", "12", "--save-every", "2", "--eval-every", "100",
          "--keep-checkpoints", "3", *TINY_TOKENIZER_FLAGS]


def weights_of(folder: Path) -> dict:
    return load_weights(folder / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    left, right = weights_of(a), weights_of(b)
    return left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("straight") / "run"
    result = run_module(STAGE1[0], *STAGE1[1:], "--output-dir", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    return output


def kill_when(command: list[str], ready, timeout: float = 120.0, poll: float = 0.002) -> None:
    """Start `command`, SIGKILL it (and its children) as soon as `ready()` is true."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(poll)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def checkpoint_exists(output: Path, step: int):
    return lambda: (output / "checkpoints" / f"step_{step:08d}").is_dir()


def checkpoint_being_written(output: Path, after_step: int):
    folder = output / "checkpoints"
    return lambda: any(path.name.startswith(".step_") and int(path.name[6:14]) > after_step
                       for path in folder.glob(".step_*.tmp")) if folder.is_dir() else False


@pytest.mark.parametrize("kill_point", ["after_step_4", "after_step_8", "during_checkpoint_write"])
def test_sigkill_and_resume_is_bitwise_identical(kill_point, straight_run, tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, "-m", *STAGE1, "--output-dir", str(output)]
    if kill_point == "during_checkpoint_write":
        kill_when(command, checkpoint_being_written(output, after_step=4))
        assert list((output / "checkpoints").glob(".step_*.tmp")), "the kill should land mid-write"
    else:
        kill_when(command, checkpoint_exists(output, int(kill_point.rsplit("_", 1)[1])))
    assert not (output / "model.safetensors").exists(), "killed before the end"
    resumed = run_module(STAGE1[0], *STAGE1[1:], "--output-dir", str(output), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert same_weights(straight_run, output)


def killed_and_resumed(command: list[str], root: Path, kill_after_step: int) -> tuple[Path, Path]:
    """Run `command` straight, and again SIGKILLed after the checkpoint of `kill_after_step` then resumed;
    return both output folders, after checking that both runs succeeded."""
    straight = run_module(*command, "--output-dir", str(root / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    output = root / "killed"
    kill_when([sys.executable, "-m", *command, "--output-dir", str(output)], checkpoint_exists(output, kill_after_step))
    assert not (output / "model.safetensors").exists(), "killed before the end"
    resumed = run_module(*command, "--output-dir", str(output), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    return root / "straight", output


@pytest.mark.slow  # the core suite covers discriminator resume (test_fsdp's GAN resume) more cheaply; run with -m slow
def test_sigkill_with_discriminator_resumes_bitwise(tmp_path):
    """VQGAN training: the discriminator, its optimizer and the RNG resume with the tokenizer."""
    command = [*STAGE1, "--discriminator-weight", "0.1", "--discriminator-start", "4", "--discriminator-layers", "2"]
    straight, output = killed_and_resumed(command, tmp_path, kill_after_step=6)
    assert same_weights(straight, output)
    final = Path("checkpoints") / "step_00000012" / "model_1.safetensors"  # the discriminator
    left, right = load_weights(straight / final), load_weights(output / final)
    assert left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)
    earlier = load_weights(straight / "checkpoints" / "step_00000008" / "model_1.safetensors")
    assert any(not earlier[k].equal(left[k]) for k in left), "the discriminator kept training"


@pytest.mark.slow  # the core suite covers SIGKILL resume (test_sigkill_and_resume_is_bitwise_identical) more cheaply; run with -m slow
def test_sigkill_with_workers_and_augmentation_resumes_bitwise(tmp_path):
    """Streaming from an image folder through 2 loader workers, with random flips and crops."""
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "photos", {"a": 40, "b": 40}, size=(20, 24))
    command = [*STAGE1, "--dataset", str(folder), "--cache-images", "never", "--num-workers", "2", "--random-flip",
               "--random-crop"]
    assert same_weights(*killed_and_resumed(command, tmp_path, kill_after_step=6))


@pytest.mark.parametrize("damage", ["truncated_weights", "missing_optimizer", "flipped_byte"])
def test_corrupt_newest_checkpoint_falls_back(damage, straight_run, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(straight_run, output)
    for name in ("model.safetensors", "config.json", "metrics.json"):
        (output / name).unlink()
    shutil.rmtree(output / "checkpoints" / "step_00000012")
    newest = output / "checkpoints" / "step_00000010"
    if damage == "truncated_weights":
        path = newest / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "missing_optimizer":
        (newest / "optimizer.bin").unlink()
    else:
        path = newest / "optimizer.bin"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    resumed = run_module(STAGE1[0], *STAGE1[1:], "--output-dir", str(output), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert len(warnings) == 1 and "step_00000010" in warnings[0]
    assert "resumed from" in resumed.stderr and "step_00000008" in resumed.stderr
    assert same_weights(straight_run, output)
    # the bad checkpoint is kept aside, not deleted, and no longer shadows the new ones
    names = sorted(path.name for path in (output / "checkpoints").iterdir())
    assert "corrupt_step_00000010" in names and "step_00000010" in names and "step_00000012" in names


def test_prior_sigkill_and_resume(tiny_tokenizer, tmp_path):
    from stage1_vqvae.export import export

    export(["--tokenizer", str(tiny_tokenizer), "--output", str(tmp_path / "codes"), "--no-progress"])
    flags = ["stage2_prior.train", "--codes", str(tmp_path / "codes"), "--max-steps", "10", "--save-every", "2",
             "--eval-every", "100", "--sample-every", "100", "--hidden-channels", "16", "--num-layers", "3",
             "--batch-size", "32", "--no-progress"]
    straight = run_module(*flags, "--output-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    output = tmp_path / "killed"
    kill_when([sys.executable, "-m", *flags, "--output-dir", str(output)], checkpoint_exists(output, 4))
    resumed = run_module(*flags, "--output-dir", str(output), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(tmp_path / "straight", output)


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    flags = [*STAGE1, "--learning-rate", "1e30", "--max-grad-norm", "0", "--warmup-steps", "1"]
    result = run_module(*flags, "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: the loss became") and " at step " in last and "--skip-nonfinite" in last
    step = int(last.split(" at step ")[1].split(";")[0])
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert all(int(name[5:]) < step for name in kept)
    # the advice in the message works: resume the stopped run, skipping such steps
    resumed = run_module(*flags, "--output-dir", str(tmp_path / "run"), "--resume", "--skip-nonfinite")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    skipped = run_module(*flags, "--output-dir", str(tmp_path / "skip"), "--skip-nonfinite")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "warning: skipped step" in skipped.stderr
    state = json.loads((tmp_path / "skip" / "checkpoints" / "step_00000012" / "trainer_state.json").read_text())
    assert state["skipped_steps"] >= 1


@pytest.mark.slow  # the core suite covers two-process resume (test_fsdp, test_resume_with_another_process_count_is_refused) more cheaply; run with -m slow
def test_two_process_run_killed_resumes_to_completion(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    port = 29700 + os.getpid() % 200

    def command(output: Path, *extra: str) -> list[str]:
        nonlocal port
        port += 1
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", *STAGE1, "--output-dir", str(output), *extra]

    straight = subprocess.run(command(tmp_path / "straight"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    output = tmp_path / "killed"
    kill_when(command(output), checkpoint_exists(output, 4))
    assert not (output / "model.safetensors").exists()
    resumed = subprocess.run(command(output, "--resume"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((output / "metrics.json").read_text())["replica_max_abs_difference"] == 0.0
    # On CPU (gloo, fixed thread count) the resumed run also matches the uninterrupted one bit for bit.
    assert same_weights(tmp_path / "straight", output)


def test_resume_with_another_process_count_is_refused(straight_run, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(straight_run, output)
    for name in ("model.safetensors", "config.json"):
        (output / name).unlink()
    shutil.rmtree(output / "checkpoints" / "step_00000012")
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file() and "logs" not in path.parts}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29400 + os.getpid() % 90), "-m", *STAGE1, "--output-dir", str(output), "--resume"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "was written by 1 process(es), this run has 2" in result.stderr
    assert all(path.read_bytes() == data for path, data in before.items() if path.name != "train_config.json")
