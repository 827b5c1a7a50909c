"""VQ-VAE-2: two-level codes, the export of both levels, a bottom prior conditioned on the top,
pipeline chains, provenance, and keep-best (also across a crash and a resume)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY_TOKENIZER_FLAGS, run_module
from pipelines import Pipeline
from pipelines.generate import main as generate_main
from shared.codes import open_codes
from stage1_vqvae import VQVAE, VQVAEConfig
from stage1_vqvae.export import export
from stage2_prior import Prior
from stage2_prior.train import main as prior_main, train as train_prior

PRIOR = ["--hidden-channels", "16", "--num-layers", "3", "--batch-size", "32", "--warmup-steps", "2", "--max-steps", "6",
         "--eval-every", "3", "--save-every", "6", "--sample-every", "6", "--no-progress"]


@pytest.fixture(scope="module")
def two_levels(tmp_path_factory):
    """A two-level tokenizer on 16x16 digits (top 2x2, bottom 4x4), its export, and the chain of priors."""
    from stage1_vqvae.train import train

    root = tmp_path_factory.mktemp("vqvae2")
    train(["--output-dir", str(root / "tokenizer"), "--levels", "2", "--max-steps", "40", "--eval-every", "40",
           "--save-every", "40", *TINY_TOKENIZER_FLAGS])
    export(["--tokenizer", str(root / "tokenizer"), "--output", str(root / "codes"), "--no-progress"])
    train_prior(["--codes", str(root / "codes"), "--level", "top", "--arch", "pixelsnail", "--attention-every", "1",
                 "--num-heads", "2", "--output-dir", str(root / "top"), *PRIOR])
    train_prior(["--codes", str(root / "codes"), "--level", "bottom", "--condition-level", "top",
                 "--output-dir", str(root / "bottom"), *PRIOR])
    return root


def test_two_level_tokenizer_codes_and_round_trip():
    model = VQVAE(VQVAEConfig(image_size=32, levels=2, hidden_channels=8, latent_channels=8, codebook_size=16))
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    model.train()
    model(images)
    model.eval()
    codes = model.encode(images)
    assert list(codes) == ["top", "bottom"]  # generation order
    assert codes["top"].shape == (3, 4, 4) and codes["bottom"].shape == (3, 8, 8)  # 1/8 and 1/4 of the side
    assert torch.allclose(model.decode(codes), model(images).reconstruction, atol=1e-6)
    # both levels matter to the reconstruction
    other = {"top": (codes["top"] + 1) % 16, "bottom": codes["bottom"]}
    assert not torch.allclose(model.decode(other), model.decode(codes))
    with pytest.raises(ValueError, match="not divisible by the downsample factor 8"):
        VQVAEConfig(image_size=36, levels=2)
    with pytest.raises(ValueError, match="pass codes as a dict"):
        model.decode(codes["bottom"])


def test_export_writes_one_column_per_level(two_levels):
    codes, metadata = open_codes(two_levels / "codes")
    assert metadata.level_names == ["top", "bottom"] and metadata.format_version == 2
    top, bottom = metadata.level("top"), metadata.level("bottom")
    assert (top.column, top.latent_shape, bottom.column, bottom.latent_shape) == (
        "codes_top", (2, 2), "codes_bottom", (4, 4))
    view = codes.level_view("bottom", "top")
    grids, labels, condition = view[:5]
    assert grids.shape == (5, 4, 4) and condition.shape == (5, 2, 2) and grids.dtype == torch.int16
    tokenizer = VQVAE.from_pretrained(two_levels / "tokenizer")
    from shared.data import DataConfig, load_split

    images = torch.stack([load_split(DataConfig(image_size=16), "train")[k][0] for k in range(5)])
    expected = tokenizer.encode(images)
    assert torch.equal(grids.long(), expected["bottom"]) and torch.equal(condition.long(), expected["top"])


def test_single_level_exports_keep_the_first_format(tiny_tokenizer, tmp_path):
    export(["--tokenizer", str(tiny_tokenizer), "--output", str(tmp_path / "codes"), "--no-progress"])
    values = json.loads((tmp_path / "codes" / "codes.json").read_text())
    assert values["format_version"] == 1 and {"vocab_size", "latent_shape", "dtype"} <= set(values)
    assert "levels" not in values


def test_bottom_prior_is_conditioned_on_the_top(two_levels):
    bottom = Prior.from_pretrained(two_levels / "bottom")
    assert (bottom.config.level, bottom.config.condition_level, tuple(bottom.config.condition_shape)) == (
        "bottom", "top", (2, 2))
    codes = torch.randint(0, 32, (2, 4, 4))
    top = torch.randint(0, 32, (2, 2, 2))
    with torch.no_grad():
        assert not torch.allclose(bottom(codes, 1, top), bottom(codes, 1, (top + 1) % 32))
    with pytest.raises(ValueError, match=r"condition code map must be integers of shape \(2, 2, 2\)"):
        bottom(codes, 1, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"condition codes must lie in \[0, 32\)"):
        bottom(codes, 1, torch.full((2, 2, 2), 40))
    assert torch.equal(bottom.sample(3, labels=2, condition=top[:1].expand(3, 2, 2), seed=1),
                       bottom.sample(3, labels=2, condition=top[:1].expand(3, 2, 2), seed=1, method="naive"))


def test_pipeline_chain_generates_both_levels_batch_independent(two_levels, tmp_path):
    tokenizer = VQVAE.from_pretrained(two_levels / "tokenizer")
    chain = [Prior.from_pretrained(two_levels / "top"), Prior.from_pretrained(two_levels / "bottom")]
    pipeline = Pipeline(tokenizer, chain)
    whole = pipeline.generate(6, labels=[0, 1, 2, 3, 4, 5], seed=3, output_type="pt", progress=False)
    split = pipeline.generate(6, labels=[0, 1, 2, 3, 4, 5], seed=3, batch_size=4, output_type="pt", progress=False)
    assert set(whole.codes) == {"top", "bottom"} and whole.images.shape == (6, 1, 16, 16)
    assert all(torch.equal(whole.codes[name], split.codes[name]) for name in whole.codes)
    assert torch.equal(whole.images, split.images)
    pipeline.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "pipeline.json").read_text())["priors"] == ["prior_top", "prior_bottom"]
    loaded = Pipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    again = loaded.generate(6, labels=[0, 1, 2, 3, 4, 5], seed=3, output_type="pt", progress=False)
    assert torch.equal(again.images, whole.images)
    # completion keeps the known top half, level by level
    images = whole.images * 2 - 1
    known = torch.zeros(6, 16, 16, dtype=torch.bool)
    known[:, :8] = True
    completed = pipeline.complete(images, known, labels=1, seed=0)
    encoded = pipeline.encode(images)
    assert torch.equal(completed.codes["top"][:, :1], encoded["top"][:, :1])
    assert torch.equal(completed.codes["bottom"][:, :2], encoded["bottom"][:, :2])
    # the command: one codes file per level
    assert generate_main(["--pipeline", str(tmp_path / "pipe"), "--output-dir", str(tmp_path / "images"),
                          "--num-images", "3", "--no-progress"]) == 0
    assert np.load(tmp_path / "images" / "codes_top.npy").shape == (3, 2, 2)
    assert np.load(tmp_path / "images" / "codes_bottom.npy").shape == (3, 4, 4)


def test_chain_out_of_order_and_provenance_are_refused(two_levels, tmp_path, capsys):
    tokenizer = VQVAE.from_pretrained(two_levels / "tokenizer")
    top, bottom = Prior.from_pretrained(two_levels / "top"), Prior.from_pretrained(two_levels / "bottom")
    with pytest.raises(ValueError, match="chain is out of order; list the priors as top, bottom"):
        Pipeline(tokenizer, [bottom, top])
    with pytest.raises(ValueError, match="2 level.*1 prior"):
        Pipeline(tokenizer, bottom)
    # a tokenizer with the same shapes but other weights: its codes mean something else
    other = VQVAE(tokenizer.config)
    with pytest.raises(ValueError, match="trained on codes of another tokenizer.*check_provenance=False"):
        Pipeline(other, [top, bottom])
    Pipeline(other, [top, bottom], check_provenance=False)  # experts may
    # a pipeline folder whose chain is out of order: the generate command refuses it in one line
    Pipeline(tokenizer, [top, bottom]).save_pretrained(tmp_path / "pipe")
    values = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    values["priors"] = list(reversed(values["priors"]))
    (tmp_path / "pipe" / "pipeline.json").write_text(json.dumps(values))
    assert generate_main(["--pipeline", str(tmp_path / "pipe"), "--output-dir", str(tmp_path / "out"),
                          "--num-images", "2", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "out of order" in error[0] and not (tmp_path / "out").exists()


def test_prior_commands_refuse_bad_levels(two_levels, tmp_path, capsys, tiny_tokenizer):
    common = ["--codes", str(two_levels / "codes"), "--output-dir", str(tmp_path / "prior"), *PRIOR]
    for extra, message in [([], "have levels top, bottom: pick one with --level"),
                           (["--level", "bottom", "--condition-level", "middle"], "no level 'middle'"),
                           (["--level", "top", "--condition-level", "top"], "is the level being modelled")]:
        assert prior_main([*common, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "prior").exists()
    # a one-level export has no top level to condition on
    export(["--tokenizer", str(tiny_tokenizer), "--output", str(tmp_path / "single"), "--no-progress"])
    assert prior_main(["--codes", str(tmp_path / "single"), "--condition-level", "top", "--output-dir",
                       str(tmp_path / "p2"), *PRIOR]) == 2
    assert "no level 'top'" in capsys.readouterr().err


def test_folder_whose_config_does_not_describe_its_weights(two_levels, tmp_path):
    shutil.copytree(two_levels / "bottom", tmp_path / "bottom")
    config = json.loads((tmp_path / "bottom" / "config.json").read_text())
    config["hidden_channels"] = 24
    (tmp_path / "bottom" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.safetensors does not match .*config.json") as error:
        Prior.from_pretrained(tmp_path / "bottom")
    assert "\n" not in str(error.value)
    result = run_module("pipelines.generate", "--pipeline", str(tmp_path / "nothing"), "--output-dir", str(tmp_path))
    assert result.returncode == 2


def best_run_flags(codes) -> list[str]:
    return ["--codes", str(codes), "--sample-every", "100", "--hidden-channels", "16", "--num-layers", "2",
            "--batch-size", "8", "--learning-rate", "0.003", "--warmup-steps", "1", "--no-progress"]


def scripted_validation(monkeypatch, bits_at_step) -> None:
    """Validation reports `bits_at_step(step)` bits/code, so which step is best is known in advance."""
    import stage2_prior.train as stage2_train

    real = stage2_train.prior_metrics

    def metrics(model, *args, **kwargs):
        values = real(model, *args, **kwargs)
        return {**values, "bits_per_code": bits_at_step(metrics.step)}

    original_run = stage2_train.TrainingSession.run

    def run(session, start_step, compute_loss, evaluate, *args, **kwargs):
        def scripted(step):  # tell the metrics which step is being validated
            metrics.step = step
            return evaluate(step)
        return original_run(session, start_step, compute_loss, scripted, *args, **kwargs)

    monkeypatch.setattr(stage2_train, "prior_metrics", metrics)
    monkeypatch.setattr(stage2_train.TrainingSession, "run", run)


def test_keep_best_keeps_the_best_validation_step(tiny_tokenizer, tmp_path, monkeypatch):
    export(["--tokenizer", str(tiny_tokenizer), "--output", str(tmp_path / "codes"), "--no-progress"])
    scripted_validation(monkeypatch, lambda step: {4: 5.0, 8: 3.0, 12: 4.0, 16: 4.5}[step])
    flags = [*best_run_flags(tmp_path / "codes"), "--max-steps", "16", "--eval-every", "4", "--save-every", "16"]
    best = train_prior(["--output-dir", str(tmp_path / "best"), *flags])
    last = train_prior(["--output-dir", str(tmp_path / "last"), "--no-keep-best", *flags])
    recorded = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert recorded["best_step"] == best["best_step"] == 8
    assert recorded["bits_per_code"] == 3.0 and recorded["last_bits_per_code"] == 4.5
    assert last["bits_per_code"] == 4.5 and last["best_step"] == 8 and last["best_bits_per_code"] == 3.0
    output = (tmp_path / "best" / "model.safetensors").read_bytes()
    assert output == (tmp_path / "best" / "best" / "step_00000008" / "model.safetensors").read_bytes()
    assert output != (tmp_path / "last" / "model.safetensors").read_bytes()
    assert sorted(path.name for path in (tmp_path / "best" / "best").iterdir()) == ["step_00000008"]


def test_keep_best_after_a_crash_and_a_resume_with_other_cadences(tiny_tokenizer, tmp_path, monkeypatch):
    """The run crashed after writing a new best model (step 12) but before checkpointing it; it is resumed
    from step 8 with another --eval-every and a smaller --max-steps. The output must be a model of the
    resumed run that metrics.json describes, never the lost run's step-12 model."""
    export(["--tokenizer", str(tiny_tokenizer), "--output", str(tmp_path / "codes"), "--no-progress"])
    scripted_validation(monkeypatch, lambda step: 10.0 - 0.1 * step)  # every validation is a new best
    run = tmp_path / "run"
    flags = best_run_flags(tmp_path / "codes")
    first = train_prior(["--output-dir", str(run), "--max-steps", "12", "--eval-every", "4", "--save-every", "8", *flags])
    assert first["best_step"] == 12
    lost = (run / "best" / "step_00000012" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "checkpoints" / "step_00000012")  # the crash: no checkpoint after the best
    for name in ("model.safetensors", "config.json", "metrics.json"):
        (run / name).unlink()
    resumed = train_prior(["--output-dir", str(run), "--resume", "--max-steps", "10", "--eval-every", "5",
                           "--save-every", "8", *flags])
    assert resumed["best_step"] == 10 and not (run / "best" / "step_00000012").exists()
    output = (run / "model.safetensors").read_bytes()
    assert output != lost
    assert output == (run / "best" / "step_00000010" / "model.safetensors").read_bytes()
    assert json.loads((run / "metrics.json").read_text())["best_step"] == 10
