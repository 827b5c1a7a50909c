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


def stepped_logits(model, method: str, codes: torch.Tensor, labels=None, condition=None, guidance_scale: float = 0.0):
    """The logits of every draw of the sampler `method` (naive, cached, compiled) on the stacked codes (B, h, w, D),
    all known so that each draw's logits are those of these codes: {(row, column, depth): (B, V)}, with the model's
    own full forward (B, h, w, D, V) for comparison."""
    from stage2_prior.conditioning import Context
    from stage2_prior.decoding import Sampler, SamplingOptions, evaluation, sample_uniforms
    from stage2_prior.decoding.sequential import run

    context = Context(labels, condition)
    sampler = Sampler(model, SamplingOptions(method=method, guidance_scale=guidance_scale,
                                             precision=str(next(model.parameters()).dtype).split(".")[1]))
    seen = {}
    with evaluation(model):
        run(sampler, context, sample_uniforms(5, 0, len(codes), codes[0].numel()), codes,
            torch.ones_like(codes, dtype=torch.bool),
            on_logits=lambda row, column, depth, logits: seen.update({(row, column, depth): logits}))
        full = model.stack_logits(codes, model.conditioning(context))
    assert len(seen) == codes[0].numel(), "the sampler skipped draws"
    return seen, full


def stepped_logit_error(model, method: str, codes: torch.Tensor, labels=None, condition=None) -> float:
    """The largest difference between the `method` logits of every draw and the full forward's."""
    seen, full = stepped_logits(model, method, codes, labels, condition)
    return max((logits.double() - full[:, row, column, depth].double()).abs().max().item()
               for (row, column, depth), logits in seen.items())
