"""Shared fixtures: tiny configs, a tiny trained tokenizer, generated image folders. All on CPU, seeded."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Tiny stage-1 model flags: 16x16 digits -> 4x4 codes from a 32-code book; trains in seconds.
TINY_TOKENIZER_FLAGS = ["--image-size", "16", "--hidden-channels", "16", "--latent-channels", "8",
                        "--num-res-blocks", "1", "--codebook-size", "32", "--batch-size", "32",
                        "--warmup-steps", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    np.random.seed(0)


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m module args...` in a fresh process and capture its output."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_torchrun(module: str, *args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node nproc -m module args...` on CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer trained for 100 steps on 16x16 digits (a finished training folder)."""
    from stage1_vqvae.train import train

    output = tmp_path_factory.mktemp("tokenizer") / "run"
    train(["--output-dir", str(output), "--max-steps", "100", "--eval-every", "100", "--save-every", "100",
           *TINY_TOKENIZER_FLAGS])
    return output


def write_image_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 24), mode: str = "RGB",
                       seed: int = 0) -> Path:
    """An image folder with one subfolder per class, holding random PNGs."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(root / name / f"{index}.png")
    return root


def tree_digest(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: compare before and after to prove nothing changed."""
    if not root.exists():
        return {}
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def cached_logit_error(model, labels, condition, batch: int = 3) -> tuple[float, float]:
    """Sample `batch` grids with the cached sampler, recording every position's logits, and return
    (the largest difference from the full forward on the drawn codes, the largest full logit)."""
    from stage2_prior.sampling import SamplingOptions, run, sample_uniforms

    height, width = model.config.latent_shape
    depth = model.config.depth
    seen = {}
    with torch.inference_mode():
        codes = run(model, "cached", labels, condition, sample_uniforms(5, 0, batch, height * width * depth),
                    torch.zeros(batch, height, width, depth, dtype=torch.long),
                    torch.zeros(batch, height, width, depth, dtype=torch.bool), SamplingOptions(),
                    on_logits=lambda row, column, entry, logits: seen.update({(row, column, entry): logits}))
        full = model.head_logits(model.features(codes, labels, condition), codes)  # (B, V, h, w, D)
    assert len(seen) == height * width * depth, "the cached sampler skipped positions"
    error = max((logits - full[:, :, row, column, entry]).abs().max().item()
                for (row, column, entry), logits in seen.items())
    return error, full.abs().max().item()
