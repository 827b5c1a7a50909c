"""The arch contract, checked for every registered arch (stage2_prior.registry.ARCHS) and every head and
stack variant it takes. A new arch joins by registering; its tiny config comes from its ArchSpec.

- causality: perturbing the codes from any draw on leaves the logits of every earlier draw unchanged,
  at every position and stack entry, and a draw sees the one just before it in its row or stack;
- full context (archs that claim it): every position depends on every earlier one, at every position;
- the cached step (and the compiled one) computes the full forward's logits at every draw;
- cached, naive and a sample drawn alone give the same codes, with filters, guidance, code maps, complete();
- save/load round trip, every parameter gets a gradient, bad configs and methods get one-line errors.
"""
from __future__ import annotations

import pytest
import torch

from conftest import stepped_logit_error
from stage2_prior import ARCHS, Prior, PriorConfig
from stage2_prior.decoding.rounds import hidden_after

GRID = (4, 5)
CONDITION_GRID = (2, 5)
VARIANTS = {
    "plain": dict(vocab_size=9),
    "conditioned": dict(vocab_size=9, num_classes=3, label_dropout=0.1, condition_vocab_size=5,
                        condition_shape=CONDITION_GRID),
    "labelled": dict(vocab_size=9, num_classes=3, label_dropout=0.1),  # archs that take no code map
    "stack": dict(vocab_size=9, depth=3),
    "mixture": dict(vocab_size=16, depth=3, head="logistic_mixture", mixtures=2),
}


def takes(spec, variant: str) -> bool:
    return {"conditioned": spec.code_maps, "labelled": not spec.code_maps, "stack": spec.stacks,
            "mixture": spec.stacks and "logistic_mixture" in spec.heads}.get(variant, True)


CASES = [(arch, variant) for arch, spec in ARCHS.items() for variant in VARIANTS if takes(spec, variant)]
ORDERED = [(arch, variant) for arch, variant in CASES if ARCHS[arch].family == "autoregressive"]
LABELLED = {arch: "conditioned" if spec.code_maps else "labelled" for arch, spec in ARCHS.items()}


def build(arch: str, variant: str = "plain", dtype=torch.float32, latent_shape=GRID, seed=0, **extra) -> Prior:
    """The arch's tiny config in a variant, weights N(0, 0.4) so that every dependency shows in the logits.
    A pyramid arch takes its tiny scales, or scales 1 .. n for a grid of n rows."""
    torch.manual_seed(seed)
    values = {**ARCHS[arch].tiny, **VARIANTS[variant], "dropout": 0.0, **extra}
    if ARCHS[arch].reads == "scales":
        if latent_shape != GRID:
            values["scales"] = tuple(range(1, latent_shape[0] + 1))
        latent_shape = (1, sum(side * side for side in values["scales"]))
    model = Prior.from_config(PriorConfig(arch=arch, latent_shape=latent_shape, **values)).to(dtype).eval()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.4)
    return model


def conditions(model: Prior, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    config = model.config
    generator = torch.Generator().manual_seed(7)
    labels = torch.arange(batch) % config.num_classes if config.num_classes else None
    condition = (torch.randint(0, config.condition_vocab_size, (batch, *config.condition_grid), generator=generator)
                 if config.condition_shape else None)
    return labels, condition


def random_codes(model: Prior, batch: int, seed: int = 1) -> torch.Tensor:
    """Stacked codes (batch, h, w, D)."""
    config = model.config
    return torch.randint(0, config.vocab_size, (batch, *config.latent_shape, config.depth),
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, variant", ORDERED)
def test_causal_at_every_draw(arch, variant):
    model = build(arch, variant, torch.float64)
    config = model.config
    draws, grids = config.num_positions * config.depth, 8  # several grids: a ReLU that is off hides nothing
    base = random_codes(model, grids).flatten(1)  # (G, h*w*D)
    # row (g, i): grid g with every code from draw i on replaced by another value; row (g, draws) is grid g
    index = torch.arange(draws)
    later = index[None, :] >= index[:, None]  # (draws, draws)
    shift = torch.randint(1, config.vocab_size, (grids, draws, draws), generator=torch.Generator().manual_seed(2))
    perturbed = base[:, None].repeat(1, draws + 1, 1)  # (G, draws + 1, draws)
    perturbed[:, :draws] = torch.where(later, (perturbed[:, :draws] + shift) % config.vocab_size, perturbed[:, :draws])
    rows = grids * (draws + 1)
    labels, condition = conditions(model, 1)
    labels = None if labels is None else labels.expand(rows)
    condition = None if condition is None else condition.expand(rows, *condition.shape[1:])
    with torch.no_grad():
        logits = model.stack_logits(perturbed.view(rows, *config.latent_shape, config.depth), model.conditioning(
            model.context(labels, condition, rows))).view(grids, draws + 1, draws, -1)  # (G, draws + 1, draws, V)
    change = (logits[:, :draws] - logits[:, draws:]).abs().amax((0, -1))  # (draws, draws): how much draw j moved
    after = index[None, :] > index[:, None]  # draw j may move when the codes from draw i < j on change
    assert change[~after].max() < 1e-12, f"{arch}/{variant}: a draw sees its own or a later code"
    width, depth = config.latent_shape[1], config.depth
    if model.parallel_runs is not None:  # a run reads nothing of itself, and everything before it (VAR's scales)
        for first, count in model.parallel_runs:
            inside = slice(first, first + count)
            assert change[inside, inside].max() < 1e-12, f"{arch}/{variant}: a run at {first} sees itself"
            if first:
                assert change[first - 1, inside].min() > 1e-6, f"{arch}/{variant}: the run at {first} is blind"
        return
    for i in range(draws - 1):  # the next draw in the same row (or stack) sees the code just before it
        position, entry = divmod(i, depth)
        if entry + 1 < depth or (position + 1) % width:
            assert change[i, i + 1] > 1e-6, f"{arch}/{variant}: draw {i + 1} does not see draw {i}"


@pytest.mark.parametrize("arch", [arch for arch, spec in ARCHS.items() if spec.full_context])
def test_full_context_at_every_position(arch):
    """Every position depends on every earlier one, checked at every position of a grid wider than the tiny
    network's convolutions reach (PixelSNAIL once missed the last code of the row above at each row start)."""
    model = build(arch, latent_shape=(4, 9), dtype=torch.float64)
    height, width = model.config.latent_shape
    positions = torch.arange(height * width)
    runs = model.parallel_runs or [(position, 1) for position in range(height * width)]
    run_start = torch.cat([torch.full((count,), first) for first, count in runs])  # (N,): where each one's run starts
    codes = random_codes(model, 3)  # a few grids, so that no ReLU that happens to be off hides a dependency
    embedded = model.embed(codes).detach().requires_grad_(True)  # (3, C, h, w)
    model.embed = lambda _: embedded
    try:
        logits = model.stack_logits(codes, model.conditioning(model.context(None, None, 3)))  # (3, h, w, 1, V)
        for position in range(height * width):
            row, column = divmod(position, width)
            (gradient,) = torch.autograd.grad(logits[:, row, column].sum(), embedded, retain_graph=True)
            seen = gradient.abs().sum((0, 1)).flatten() > 0  # (h*w,)
            assert torch.equal(seen, positions < run_start[position]), f"{arch}: position {position}"
    finally:
        del model.embed


def cached_cases():
    return [(arch, variant) for arch, variant in ORDERED if "cached" in build(arch, variant).sampling_methods]


@pytest.mark.parametrize("arch, variant", cached_cases())
def test_cached_step_is_the_full_forward(arch, variant):
    """In float64 the incremental state's logits agree with the full forward's to rounding at every draw."""
    model = build(arch, variant, torch.float64)
    labels, condition = conditions(model, 2)
    error = stepped_logit_error(model, "cached", random_codes(model, 2), labels, condition)
    assert error < 1e-9, f"{arch}/{variant}: cached logits differ from the full forward by {error:.3g}"


def eager_methods(model: Prior) -> list[dict]:
    """The sampling methods to compare: all but the compiled ones (tests/test_stage2.py compiles each chain),
    and Jacobi with a window where the arch has a windowed step."""
    methods = [dict(method=method) for method in model.sampling_methods if method not in ("compiled", "graph")]
    if model.state_class() is not None and model.state_class().has_window():
        methods += [dict(method="jacobi", window=1), dict(method="jacobi", window=3)]
    return methods


@pytest.mark.parametrize("arch, variant", CASES)
def test_methods_draw_the_same_codes_for_any_batch(arch, variant):
    model = build(arch, variant)
    labels, condition = conditions(model, 4)
    methods = eager_methods(model)
    options = [dict(), dict(temperature=0.8, top_k=3), dict(top_p=0.7), dict(strategy="greedy")]
    if model.config.null_class is not None:
        options += [dict(guidance_scale=2.0), dict(guidance_scale=2.0, guidance_schedule="power:2")]
    if ARCHS[arch].family == "masked":
        options += [dict(steps=1), dict(steps=model.config.num_positions, top_k=4)]
    for option in options:
        drawn = [model.sample(4, labels=labels, condition=condition, seed=3, **method, **option) for method in methods]
        reference = drawn[0]
        assert all(torch.equal(codes, reference) for codes in drawn), f"{arch}/{variant} {option}"
        alone = model.sample(1, labels=None if labels is None else labels[2:3],
                             condition=None if condition is None else condition[2:3], seed=3, sample_offset=2,
                             **option)
        assert torch.equal(alone[0], reference[2]), f"{arch}/{variant} {option}: a sample depends on its batch"


@pytest.mark.parametrize("arch, variant", CASES)
def test_complete_keeps_known_codes_and_is_exact(arch, variant):
    model = build(arch, variant)
    labels, condition = conditions(model, 2)
    codes = model.public(random_codes(model, 2))
    known = torch.zeros_like(codes, dtype=torch.bool)
    known.view(2, -1)[:, :GRID[1] * model.config.depth] = True  # the top row (of a pyramid: its first scales)
    known.view(2, -1)[1, -1] = True  # and one code after unknown ones
    completed = [model.complete(codes, known, labels=labels, condition=condition, seed=1, **method)
                 for method in eager_methods(model)]
    for result in completed:
        assert torch.equal(result[known], codes[known])
        assert torch.equal(result, completed[0])


@pytest.mark.parametrize("arch, variant", CASES)
def test_save_load_round_trip(arch, variant, tmp_path):
    model = build(arch, variant)
    model.save_pretrained(tmp_path / "prior")
    loaded = Prior.from_pretrained(tmp_path / "prior")
    assert type(loaded) is type(model) and loaded.config == model.config
    labels, condition = conditions(model, 2)
    codes = model.public(random_codes(model, 2))
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels, condition), model(codes, labels, condition))


@pytest.mark.parametrize("arch, variant", CASES)
def test_every_parameter_gets_a_gradient(arch, variant):
    model = build(arch, variant, dropout=0.1).train()
    labels, condition = conditions(model, 6)
    codes = model.public(random_codes(model, 6))
    loss = model.nll(codes, labels, condition)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [name for name, parameter in model.named_parameters()
               if parameter.grad is None or parameter.grad.abs().max() == 0]
    assert missing == [], f"{arch}/{variant}: no gradient for {missing}"
    with torch.no_grad():  # dropout acts in training only
        model.eval()
        assert torch.equal(model(codes, labels, condition), model(codes, labels, condition))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bad_configs_and_methods_get_one_line_errors(arch):
    spec = ARCHS[arch]
    with pytest.raises(ValueError, match=f"no_such_option is not an option of arch {arch}") as error:
        PriorConfig(arch=arch, options={"no_such_option": 1})
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="hidden_channels >= 1"):
        PriorConfig(arch=arch, hidden_channels=0)
    for head in set(("softmax", "logistic_mixture")) - set(spec.heads):
        with pytest.raises(ValueError, match=f"arch {arch} takes the heads"):
            PriorConfig(arch=arch, head=head, vocab_size=16)
    model = build(arch)
    for method in set(("cached", "compiled")) - set(model.sampling_methods):
        with pytest.raises(ValueError, match=f"arch '{arch}' has no .*; its methods are "
                                             f"{', '.join(model.sampling_methods)}"):
            model.sample(1, method=method)
    if spec.family == "autoregressive" and not (model.state_class() and model.state_class().has_window()):
        with pytest.raises(ValueError, match=f"arch '{arch}' has no windowed step.*method='jacobi' without a window"):
            model.sample(1, method="jacobi", window=4)


def test_an_unknown_arch_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown arch 'pixelcnnx'; registered archs: " + ", ".join(ARCHS)):
        PriorConfig(arch="pixelcnnx")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_labels_and_code_maps_reach_the_logits(arch):
    model = build(arch, LABELLED[arch])
    labels, condition = conditions(model, 2)
    codes = model.public(random_codes(model, 2))
    with torch.no_grad():
        logits = model(codes, labels, condition)
        assert not torch.allclose(logits, model(codes, (labels + 1) % 3, condition))
        if condition is not None:
            other = (condition + 1) % model.config.condition_vocab_size
            assert (logits - model(codes, labels, other)).abs().amax(1)[:, 0, 0].min() > 0  # the first position too


@pytest.mark.parametrize("arch, variant", [case for case in ORDERED if case[1] in ("plain", "conditioned", "labelled")])
def test_beam_search_is_the_same_with_every_method(arch, variant):
    model = build(arch, variant)
    labels, condition = conditions(model, 2)
    guidance = 1.5 if model.config.null_class is not None else 0.0
    found = {method: model.beam_search(2, labels=labels, num_beams=3, condition=condition, guidance_scale=guidance,
                                       method=method) for method in model.sampling_methods if method in ("cached", "naive")}
    first = next(iter(found.values()))
    assert all(torch.equal(result.codes, first.codes) and torch.allclose(result.score, first.score)
               for result in found.values())
    assert torch.allclose(first.log_prob, model.log_prob(first.codes, labels, condition))  # unguided, as documented
    if not guidance:
        assert torch.allclose(first.score, first.log_prob)
    else:  # the score is what the search maximised: the guided log-probabilities, not the prior's
        assert not torch.allclose(first.score, first.log_prob)


MASKED = [(arch, variant) for arch, variant in CASES if ARCHS[arch].family == "masked"]


@pytest.mark.parametrize("arch, variant", MASKED)
def test_a_masked_prior_never_sees_a_hidden_code_and_sees_every_visible_one(arch, variant):
    model = build(arch, variant, torch.float64)
    labels, _ = conditions(model, 3)
    codes = model.public(random_codes(model, 3))
    hidden = torch.rand(codes.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    other = torch.where(hidden, (codes + 1) % model.config.vocab_size, codes)  # only hidden codes differ
    with torch.no_grad():
        logits = model(codes, labels, hidden=hidden)
        assert torch.equal(logits, model(other, labels, hidden=hidden))
        visible = torch.zeros_like(hidden)
        visible[:, -1, -1] = True  # the last code shown: every position's logits move, the first included
        moved = model(torch.where(visible, (codes + 1) % model.config.vocab_size, codes), labels, hidden=~visible)
        assert (moved - model(codes, labels, hidden=~visible)).abs().amax(1).min() > 1e-9


@pytest.mark.parametrize("arch, variant", MASKED)
def test_masked_rounds_reveal_on_the_cosine_schedule_and_refuse_bad_steps(arch, variant):
    model = build(arch, variant)
    positions = model.config.num_positions
    hidden, revealed = torch.tensor([positions]), []
    for round_index in range(8):
        after = hidden_after(round_index, 8, torch.tensor([positions]), hidden)
        revealed.append(int(hidden - after))
        hidden = after
    assert int(hidden) == 0 and min(revealed) >= 1 and sum(revealed) == positions
    assert revealed[0] < revealed[-1]  # the cosine schedule reveals few codes first, many last
    labels, _ = conditions(model, 1)
    _, stats = model.sample(1, labels=labels, seed=0, steps=5, return_stats=True)
    assert stats.sequential_passes.tolist() == [5]
    for steps in (0, positions + 1):
        with pytest.raises(ValueError, match="steps"):
            model.sample(1, labels=labels, steps=steps)
    for refused in (lambda: model.log_prob(model.public(random_codes(model, 1)), labels),
                    lambda: model.beam_search(1, labels=labels)):
        with pytest.raises(ValueError, match="masked prior"):
            refused()


@pytest.mark.parametrize("arch", sorted({arch for arch, _ in MASKED}))
@pytest.mark.parametrize("option", [dict(), dict(top_p=0.8), dict(guidance_scale=2.0)])
def test_masked_rounds_in_float32_re_decide_and_equal_float64(arch, option):
    """The float32 guard of rounds: draws near a boundary (of a code's CDF or of the kept set) are re-decided
    from the sample's own float64 forward, so float32 gives float64's codes, and a sample its batch row's.
    64 samples, vocabulary 16 and seed 2: a batch where the guard fires under every option (1 or 2 draws)."""
    model = build(arch, LABELLED[arch], vocab_size=16)
    labels, condition = conditions(model, 64)
    keywords = dict(seed=2, steps=4, **option)
    codes, stats = model.sample(64, labels=labels, condition=condition, precision="float32", return_stats=True,
                                **keywords)
    assert stats.recomputed > 0  # the guard ran; a test where it never fires could not fail
    assert torch.equal(codes, model.sample(64, labels=labels, condition=condition, precision="float64", **keywords))
    for row in range(0, 64, 3):  # a third of the rows, alone
        alone = model.sample(1, labels=labels[row:row + 1], precision="float32", sample_offset=row, **keywords,
                             condition=None if condition is None else condition[row:row + 1])
        assert torch.equal(alone[0], codes[row]), row
