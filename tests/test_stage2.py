"""Stage 2: causal layers, the prior, its samplers, and the train command."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import stepped_logit_error
from stage2_prior import ARCHS, GatedPixelCNN, Prior, PriorConfig
from stage2_prior.layers import GatedBlock, MaskedConv2d
from stage2_prior.train import train


def tiny_prior(arch="gated", num_classes=None, latent_shape=(5, 6), num_layers=4, kernel_size=3, seed=0):
    torch.manual_seed(seed)
    model = GatedPixelCNN(PriorConfig(vocab_size=11, latent_shape=latent_shape, num_classes=num_classes,
                                      hidden_channels=8, num_layers=num_layers, options=dict(kernel_size=kernel_size),
                                      arch=arch))
    for parameter in model.parameters():  # larger than default init, so every dependency shows in the logits
        parameter.data.normal_(0, 0.5)
    return model.eval()


def dependency(model, position: int, num_classes=None) -> torch.Tensor:
    """|d logits[p] / d embedded input[q]| summed, for every raster position q: shape (h * w,)."""
    height, width = model.config.latent_shape
    codes = torch.randint(0, model.config.vocab_size, (1, height, width))
    embedded = model.embed(codes[..., None]).detach().requires_grad_(True)  # (1, C, h, w)
    model.embed = lambda _: embedded  # differentiate with respect to the embedded grid
    try:
        logits = model(codes, 0 if num_classes else None)
    finally:
        del model.embed
    row, column = divmod(position, width)
    logits[0, :, row, column].sum().backward()
    return embedded.grad[0].abs().sum(0).flatten()  # (h*w,)


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_model_is_causal(arch, kernel_size):
    model = tiny_prior(arch, num_classes=3, kernel_size=kernel_size)
    for position in torch.randperm(30)[:8].tolist():
        grads = dependency(model, position, num_classes=3)
        assert grads[position:].abs().max() == 0, f"position {position} sees the future"
    # the perturbation form: changing codes at positions >= p leaves logits at p unchanged
    codes = torch.randint(0, 11, (2, 5, 6))
    position = 13
    changed = codes.clone().flatten(1)
    changed[:, position:] = torch.randint(0, 11, changed[:, position:].shape)
    before = model(codes, 1).flatten(2)[:, :, :position + 1]
    after = model(changed.view_as(codes), 1).flatten(2)[:, :, :position + 1]
    assert torch.equal(before, after)


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_conv_is_causal(mask_type):
    conv = MaskedConv2d(2, 3, 5, mask_type)
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    conv(x)[0, :, 3, 2].sum().backward()
    grads = x.grad[0].abs().sum(0).flatten()  # (36,)
    centre = 3 * 6 + 2
    assert grads[centre + 1:].max() == 0
    assert (grads[centre] > 0) == (mask_type == "B")
    assert "mask" not in conv.state_dict()  # non-persistent


def test_gated_block_stacks_are_causal():
    block = GatedBlock(4, 3, label_rows=None, first=True)
    vertical = torch.randn(1, 4, 5, 5, requires_grad=True)
    horizontal = torch.randn(1, 4, 5, 5, requires_grad=True)
    v_out, h_out, skip = block(vertical, horizontal, None)
    (v_out[0, :, 2, 2].sum()).backward(retain_graph=True)
    assert vertical.grad[0, :, 2:].abs().max() == 0  # the vertical stack sees only rows above
    vertical.grad = None
    (h_out[0, :, 2, 2].sum() + skip[0, :, 2, 2].sum()).backward()
    assert horizontal.grad[0, :, 2, 2:].abs().max() == 0 and horizontal.grad[0, :, 3:].abs().max() == 0
    assert horizontal.grad[0, :, :2].abs().max() == 0  # the horizontal stack sees only its own row
    assert vertical.grad[0, :, 2:].abs().max() == 0


def test_no_blind_spot_for_gated_and_blind_spot_for_pixelcnn():
    # 10 layers of 3x3 cover a 5x6 grid: the last position, and the first of the last row, see every earlier one
    for position in (29, 24):
        gated = dependency(tiny_prior("gated", num_layers=10), position)
        assert (gated[:position] > 0).all()
    # the masked stack cannot see up-and-right of its diagonal: from (4, 0), position (3, 2) stays hidden
    plain = dependency(tiny_prior("pixelcnn", num_layers=10), 24)
    assert plain[3 * 6 + 2] == 0 and plain[3 * 6 + 1] > 0


@pytest.mark.parametrize("config", [
    dict(options=dict(kernel_size=7), num_layers=3, num_classes=2),
    dict(options=dict(kernel_size=5), latent_shape=(6, 2)),  # a grid narrower than the kernel
    dict(depth=3),  # channel groups: the first layer reads the position's own lower groups
    dict(depth=2, arch="pixelsnail", options=dict(attention_every=1, num_heads=2)),  # the stream keeps its biases
    dict(latent_shape=(4, 6), condition_shape=(2, 3), condition_vocab_size=5),
])
def test_gated_shortcuts_compute_the_full_forward_in_float64(config):
    """Every incremental shortcut of the gated state (unfolded row start, biases folded out of the stream,
    tap 0 of layer 0 alone) computes the full forward's logits, also for kernel sizes and grids the
    contract suite's tiny configs do not reach: in float64 they agree to rounding."""
    model, labels, condition = float64_prior(config)
    assert stepped_logit_error(model, "cached", codes_of(model), labels, condition) < 1e-9


def float64_prior(config: dict):
    """A float64 prior with weights N(0, 0.5) (logits that spread like a trained model's, or wider), and the
    labels and condition map of two samples."""
    settings = dict(vocab_size=11, latent_shape=(5, 6), hidden_channels=12, num_layers=4)
    settings.update(config)
    torch.manual_seed(0)
    model = Prior.from_config(PriorConfig(**settings)).double().eval()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.5)
    labels = torch.tensor([0, 1]) if model.config.num_classes else None
    condition = torch.randint(0, 5, (2, 2, 3)) if model.config.condition_shape else None
    return model, labels, condition


def codes_of(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, *model.config.latent_shape, model.config.depth),
                         generator=torch.Generator().manual_seed(3))


def compiled_cases():
    """Every registered arch whose state has a chain, with labels, a condition map or a stack."""
    cases = []
    grid_archs = [(arch, spec) for arch, spec in ARCHS.items() if spec.reads == "grid" and spec.family == "autoregressive"]
    for index, (arch, spec) in enumerate(grid_archs):
        extra = [dict(num_classes=2), dict(depth=2), dict(latent_shape=(4, 6), condition_shape=(2, 3),
                                                          condition_vocab_size=5)][index % 3]
        config = {**spec.tiny, "arch": arch, **extra}
        model, _, _ = float64_prior(config)
        if "compiled" in model.sampling_methods:
            cases.append(pytest.param(config, id=arch))
    return cases


@pytest.mark.parametrize("config", compiled_cases())
def test_every_arch_with_a_chain_compiles_its_step_once(config):
    """method="compiled": torch.compile of each arch's per-position chain (method "graph" adds CUDA
    graphs on a GPU). Its float64 logits are the full forward's, and it is one graph that no position
    recompiles: the shapes stay fixed and the position is a tensor (a recompile raises here)."""
    from torch._dynamo.utils import counters

    model, labels, condition = float64_prior(config)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert stepped_logit_error(model, "compiled", codes_of(model), labels, condition) < 1e-9
    assert counters["stats"]["unique_graphs"] == 1  # no graph break splits the chain


def test_compiled_step_survives_many_batch_sizes():
    """A session that samples at more batch sizes than dynamo's recompile limit (8) keeps working: after
    the first change the batch is compiled as a dynamic size."""
    model = tiny_prior()
    torch._dynamo.reset()
    for batch in range(1, 12):
        assert torch.equal(model.sample(batch, seed=1, method="compiled"), model.sample(batch, seed=1))


def test_a_float64_model_samples_in_float64_as_it_is():
    model = tiny_prior(num_classes=3).double()
    cached = model.sample(2, labels=1, seed=2, method="cached")
    assert torch.equal(cached, model.sample(2, labels=1, seed=2, method="naive"))
    assert torch.equal(cached, tiny_prior(num_classes=3).sample(2, labels=1, seed=2))  # float32 weights, float64 run


@pytest.mark.parametrize("precision", ["bfloat16", "float64"])
def test_the_network_runs_in_the_precision_asked_for(precision, monkeypatch):
    """precision="bfloat16" (for GPUs; not exact): the network runs in bfloat16 and nothing measures a
    tolerance or recomputes a draw in float64; the same call still gives the same codes. float64 runs
    the guard."""
    import stage2_prior.decoding.guard as guard
    import stage2_prior.decoding.sampler as sampler

    model = tiny_prior(num_classes=3)
    float64 = model.sample(6, labels=1, seed=2)
    dtypes, measured = [], []
    original_stack_logits = GatedPixelCNN.stack_logits
    monkeypatch.setattr(GatedPixelCNN, "stack_logits", lambda self, *args: dtypes.append(
        next(self.parameters()).dtype) or original_stack_logits(self, *args))
    for name in ("measure_tolerance", "measure_canonical_tolerance"):  # float64 naive measures the canonical one
        original = getattr(sampler, name)
        monkeypatch.setattr(sampler, name, lambda *args, original=original: measured.append(1) or original(*args))
    if precision == "bfloat16":
        monkeypatch.setattr(guard, "canonical_logits", lambda *args, **kwargs: pytest.fail("bfloat16 recomputed a draw"))
    codes = model.sample(6, labels=1, seed=2, precision=precision, method="naive")
    assert set(dtypes) == {getattr(torch, precision)} and bool(measured) == (precision == "float64")
    assert torch.equal(codes, model.sample(6, labels=1, seed=2, precision=precision, method="naive"))
    if precision == "bfloat16":
        assert (codes == float64).float().mean() > 0.5  # the same distribution, rounded: most draws agree
    else:
        assert torch.equal(codes, float64)


def test_sampling_determinism_and_batch_independence():
    model = tiny_prior(num_classes=3)
    labels = torch.tensor([0, 1, 2, 0, 1])
    together = model.sample(5, labels=labels, seed=7)
    assert torch.equal(together, model.sample(5, labels=labels, seed=7))
    first = model.sample(2, labels=labels[:2], seed=7)
    rest = model.sample(3, labels=labels[2:], seed=7, sample_offset=2)
    assert torch.equal(torch.cat([first, rest]), together)
    assert not torch.equal(model.sample(5, labels=labels, seed=8), together)
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(model.sample(2, labels=0, generator=generator),
                       model.sample(2, labels=0, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.full((1, 5, 6), 11)), r"codes must lie in \[0, 11\)"),
    (lambda m: m(torch.zeros(1, 4, 6, dtype=torch.long)), r"shape \(B, 5, 6\)"),
    (lambda m: m.sample(1, labels=None), "class-conditional"),
    (lambda m: m.sample(1, labels=3), r"labels must lie in \[0, 3\)"),
    (lambda m: m.sample(1, labels=0, top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (lambda m: m.sample(1, labels=0, top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (lambda m: m.sample(1, labels=0, top_k=0), "top_k must be an integer of at least 1"),
    (lambda m: m.sample(1, labels=0, temperature=-1), "temperature must be positive"),
    (lambda m: m.sample(0, labels=0), "at least 1"),
    (lambda m: m.complete(torch.zeros(1, 5, 6, dtype=torch.long), torch.zeros(1, 5, 5, dtype=torch.bool), labels=0),
     "known_mask must have the shape"),
])
def test_api_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_prior(num_classes=3))


def test_unconditional_refuses_labels():
    with pytest.raises(ValueError, match="unconditional"):
        tiny_prior().sample(1, labels=0)


PRIOR_FLAGS = ["--hidden-channels", "16", "--num-layers", "4", "--batch-size", "32", "--warmup-steps", "2",
               "--no-progress"]


@pytest.fixture(scope="module")
def tiny_codes(tiny_tokenizer, tmp_path_factory):
    from stage1_vqvae.export import export

    root = tmp_path_factory.mktemp("codes")
    export(["--tokenizer", str(tiny_tokenizer), "--output", str(root / "train"), "--no-progress"])
    return root / "train"


def test_sample_grids_follow_sample_every_not_eval_every(tiny_codes, tmp_path):
    train(["--codes", str(tiny_codes), "--output-dir", str(tmp_path / "run"), "--max-steps", "7", "--eval-every", "4",
           "--save-every", "7", "--sample-every", "3", *PRIOR_FLAGS])
    written = sorted(path.name for path in (tmp_path / "run" / "samples").iterdir())
    assert written == ["samples_00000003.png", "samples_00000006.png", "samples_00000007.png"]


def test_train_and_resume(tiny_codes, tmp_path):
    flags = ["--codes", str(tiny_codes), "--save-every", "4", "--eval-every", "4", "--sample-every", "4", *PRIOR_FLAGS]
    metrics = train(["--output-dir", str(tmp_path / "straight"), "--max-steps", "8", *flags])
    assert {"bits_per_code", "top1_accuracy", "unigram_entropy_bits"} <= set(metrics)
    prior = GatedPixelCNN.from_pretrained(tmp_path / "straight")
    assert prior.config.num_classes == 10 and prior.config.vocab_size == 32 and prior.config.latent_shape == (4, 4)
    assert (tmp_path / "straight" / "samples" / "samples_00000008.png").is_file()  # tokenizer found via codes.json
    train(["--output-dir", str(tmp_path / "resumed"), "--max-steps", "8", *flags])
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000008")
    (tmp_path / "resumed" / "model.safetensors").unlink()
    (tmp_path / "resumed" / "config.json").unlink()
    train(["--output-dir", str(tmp_path / "resumed"), "--max-steps", "8", "--resume", *flags])
    assert (tmp_path / "straight" / "model.safetensors").read_bytes() == \
        (tmp_path / "resumed" / "model.safetensors").read_bytes()




def test_default_run_length_follows_the_data():
    from stage2_prior.config import AUTO_EPOCHS, AUTO_MAX_STEPS, AUTO_MIN_STEPS, default_max_steps

    assert default_max_steps(1455, 64) == AUTO_EPOCHS * 23  # the digits export: 23 batches per pass
    assert default_max_steps(1455, 128) == AUTO_EPOCHS * 12  # two processes: the same passes, half the steps
    assert default_max_steps(10, 64) == AUTO_MIN_STEPS
    assert default_max_steps(1_281_167, 64) == AUTO_MAX_STEPS


def test_train_without_max_steps_records_the_chosen_length(tiny_codes, tmp_path, monkeypatch):
    import stage2_prior.train as stage2_train

    seen = []
    monkeypatch.setattr(stage2_train, "default_max_steps", lambda rows, batch: seen.append((rows, batch)) or 3)
    train(["--codes", str(tiny_codes), "--output-dir", str(tmp_path / "run"), *PRIOR_FLAGS])
    assert seen == [(len(stage2_train.load_codes(stage2_train.Stage2TrainConfig(codes=str(tiny_codes)))[0]), 32)]
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["max_steps"] == 3 and (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()
