"""Exact sampling where it could break: the default-size prior with the logit spread of a trained one.

The first release promised that cached sampling equals naive sampling and that codes do not depend
on the batch; with tiny models that held, at trained scale about 1 draw in 3,000 differed. These
tests use the default prior (vocab 512, 64 channels, 15 layers) with its weights scaled until its
logits have a standard deviation of 6, hundreds of samples and several offsets.
"""
from __future__ import annotations

import io
import itertools

import pytest
import torch

from conftest import stepped_logits
from stage2_prior import ARCHS, Prior, PriorConfig
from stage2_prior.registry import trained_scale
from stage2_prior.testing import trained_scale_prior
from stage2_prior.conditioning import Context
from stage2_prior.decoding import Sampler, SamplingOptions, cast_copy, decide, sample_uniforms
from stage2_prior.decoding.sequential import run


@pytest.fixture(scope="module")
def prior8() -> Prior:
    return trained_scale_prior(8)


def test_the_reported_case_and_many_offsets_cached_equals_naive(prior8):
    # the call the first release got wrong, and three more offsets: 4 x 16 samples x 64 draws
    for offset in (109, 0, 517, 2 ** 40):
        cached = prior8.sample(16, seed=5, sample_offset=offset)
        naive = prior8.sample(16, seed=5, sample_offset=offset, method="naive")
        assert torch.equal(cached, naive), offset


def test_codes_do_not_depend_on_the_batch(prior8):
    together = prior8.sample(192, seed=11, sample_offset=3)
    one_by_one = torch.cat([prior8.sample(1, seed=11, sample_offset=3 + k) for k in range(64)])
    uneven = torch.cat([prior8.sample(count, seed=11, sample_offset=3 + start)
                        for start, count in ((0, 7), (7, 100), (107, 85))])
    assert torch.equal(together[:64], one_by_one) and torch.equal(together, uneven)


def test_float32_and_float64_sampling_give_the_same_codes(prior8):
    # float32 logits are off by ~5e-4 here; the guard re-decides every draw that error could flip.
    # Without the guard one of these 192 samples comes out differently (seen on the development machine).
    as_float64 = prior8.sample(192, seed=2, sample_offset=40)
    assert torch.equal(prior8.sample(192, seed=2, sample_offset=40, precision="float32"), as_float64)


@pytest.mark.parametrize("options", [dict(temperature=0.8, top_k=40), dict(top_p=0.9), dict(strategy="greedy")],
                         ids=["temperature+top_k", "top_p", "greedy"])
def test_filtered_and_greedy_draws_are_exact(prior8, options):
    cached = prior8.sample(24, seed=9, **options)
    assert torch.equal(cached, prior8.sample(24, seed=9, method="naive", **options))
    assert torch.equal(cached[5:9], prior8.sample(4, seed=9, sample_offset=5, **options))


def test_guided_sampling_at_scale_is_exact():
    prior = trained_scale_prior(6, num_classes=4, label_dropout=0.1, num_layers=8)
    labels = torch.arange(20) % 4
    cached = prior.sample(20, labels=labels, seed=3, guidance_scale=3.0)
    assert torch.equal(cached, prior.sample(20, labels=labels, seed=3, guidance_scale=3.0, method="naive"))
    assert torch.equal(cached[7:10], prior.sample(3, labels=labels[7:10], seed=3, sample_offset=7, guidance_scale=3.0))
    assert not torch.equal(cached, prior.sample(20, labels=labels, seed=3))  # guidance changes the draws


def test_tolerance_bounds_the_cached_error(prior8):
    """The bound the guard relies on: cached float32 logits stay within tolerance / 2 of float64 ones."""
    codes = prior8.stacked(prior8.sample(32, seed=1, precision="float32"))
    double = cast_copy(prior8, torch.float64)
    reference = double.stack_logits(codes, double.conditioning(Context()))  # (32, 8, 8, 1, V)
    seen, _ = stepped_logits(prior8, "cached", codes)
    errors = [(logits.double() - reference[:, row, column, depth]).abs().max().item()
              for (row, column, depth), logits in seen.items()]
    assert max(errors) < Sampler(prior8, SamplingOptions(precision="float32")).tolerance / 2


def trained_scale_cases():
    """Every registered arch with a cached sampler, at 64 channels and a few layers."""
    def has_cache(arch: str) -> bool:
        return "cached" in Prior.from_config(PriorConfig.build(**trained_scale(arch, side=2))).sampling_methods

    return [pytest.param(trained_scale(arch), id=arch) for arch in ARCHS if has_cache(arch)]


@pytest.mark.parametrize("config", trained_scale_cases())
def test_every_cached_arch_is_exact_at_trained_scale(config):
    """Every cached arch at 64 channels and the logit spread of a trained prior: float32 and float64
    cached sampling draw the naive sampler's codes, and a sample drawn alone is the same. In float32 the
    guard must have sent draws to the float64 recomputation, or this test checked nothing hard."""
    prior = trained_scale_prior(8, **config)
    cached32, stats = prior.sample(32, seed=5, sample_offset=109, precision="float32", return_stats=True)
    assert stats.recomputed > 0, "no draw came near a boundary"
    naive = prior.sample(32, seed=5, sample_offset=109, method="naive")
    assert torch.equal(cached32, naive)
    assert torch.equal(prior.sample(32, seed=5, sample_offset=109), naive)
    assert torch.equal(prior.sample(1, seed=5, sample_offset=116, precision="float32"), naive[7:8])


@pytest.mark.slow
def test_hundreds_of_samples_at_16x16():
    prior = trained_scale_prior(16)
    for offset in (109, 10_000):
        together = prior.sample(128, seed=5, sample_offset=offset)
        assert torch.equal(together[:16], prior.sample(16, seed=5, sample_offset=offset, method="naive"))
        assert torch.equal(together[40:44], torch.cat([prior.sample(1, seed=5, sample_offset=offset + 40 + k)
                                                        for k in range(4)]))


def test_sampling_leaves_every_global_setting_as_it_found_it():
    prior = Prior.from_config(PriorConfig(vocab_size=16, latent_shape=(3, 3), hidden_channels=8, num_layers=2))
    prior.train()
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, True
    torch.set_float32_matmul_precision("high")
    try:
        before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                  torch.get_float32_matmul_precision(), torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        state = torch.get_rng_state()
        for method in ("cached", "naive", "compiled"):
            prior.sample(2, seed=0, method=method)
        prior.beam_search(1, num_beams=2)
        after = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                 torch.get_float32_matmul_precision(), torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        assert after == before and prior.training and torch.equal(torch.get_rng_state(), state)
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) = saved[:3]
        torch.set_float32_matmul_precision(saved[3])


def tiny_exhaustive_prior(num_classes=None) -> Prior:
    torch.manual_seed(4)
    prior = Prior.from_config(PriorConfig(vocab_size=3, latent_shape=(2, 2), hidden_channels=8, num_layers=3,
                                          num_classes=num_classes)).eval()
    for parameter in prior.parameters():
        parameter.data.normal_(0, 0.7)
    return prior


def test_log_prob_is_a_normalised_distribution_and_beam_search_finds_its_mode():
    prior = tiny_exhaustive_prior(num_classes=2)
    grids = torch.tensor(list(itertools.product(range(3), repeat=4))).view(-1, 2, 2)  # all 81 grids
    log_probs = prior.log_prob(grids, labels=1)
    assert log_probs.dtype == torch.float64 and log_probs.logsumexp(0).item() == pytest.approx(0.0, abs=1e-9)
    best = beam_search = prior.beam_search(1, labels=1, num_beams=81)
    assert torch.equal(best.codes[0], grids[log_probs.argmax()])
    assert best.log_prob.item() == pytest.approx(log_probs.max().item(), abs=1e-9)
    # one beam is greedy decoding; beam search is exact against naive
    assert torch.equal(prior.beam_search(1, labels=1, num_beams=1).codes, prior.sample(1, labels=1, strategy="greedy"))
    assert torch.equal(prior.beam_search(2, labels=1, num_beams=3, method="naive").codes,
                       prior.beam_search(2, labels=1, num_beams=3).codes)
    assert beam_search.log_prob.item() >= prior.log_prob(prior.sample(1, labels=1, temperature=0), labels=1).item()


@pytest.mark.parametrize("call, message", [
    (lambda p: p.beam_search(1, num_beams=0), "num_beams must be an integer >= 1"),
    (lambda p: p.sample(1, temperature=0, top_p=0.9), "greedy decoding .* drop top_k and top_p"),
    (lambda p: p.sample(1, strategy="beam"), "strategy must be 'sample' or 'greedy'.*beam_search"),
    (lambda p: p.sample(1, method="graph"), "needs the model on a CUDA device"),
    (lambda p: p.sample(1, precision="float16"), "precision must be one of"),
    (lambda p: p.sample(1, guidance_scale=2.0), "unconditional"),
])
def test_decoding_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_exhaustive_prior())


def test_guidance_needs_label_dropout():
    with pytest.raises(ValueError, match="trained without label dropout.*--label-dropout"):
        tiny_exhaustive_prior(num_classes=2).sample(1, labels=0, guidance_scale=1.0)


@pytest.mark.parametrize("config", [dict(num_layers=4),
                                    pytest.param(dict(arch="transformer", num_layers=2, num_heads=2), marks=pytest.mark.slow),
                                    dict(arch="pixelsnail", num_layers=4, num_heads=2, attention_every=2)])
def test_compiled_step_draws_the_same_codes(config, monkeypatch):
    """At trained scale, method="compiled" (torch.compile of the arch's per-position chain) draws the
    cached sampler's codes: its own logit tolerance sends the draws near a CDF edge to float64. Beam
    search too, whose reorders keep the attention caches in place. Method "graph" (CUDA graphs) needs
    a GPU; on a CPU the sampler still takes its path (mode reduce-overhead, its inputs moved into the
    sampler's fixed tensors and marked static), though without graphs."""
    prior = trained_scale_prior(6, **config)
    cached = prior.sample(8, seed=4)
    assert torch.equal(prior.sample(8, seed=4, method="compiled"), cached)
    assert torch.equal(prior.sample(8, seed=4, method="compiled", precision="float32"), cached)
    assert torch.equal(prior.beam_search(2, num_beams=3, method="compiled").codes,
                       prior.beam_search(2, num_beams=3).codes)
    monkeypatch.setattr(SamplingOptions, "resolve", lambda options, model: options)  # graph on a CPU, for this test
    sampler = Sampler(prior, SamplingOptions(method="graph"))
    known = prior.stacked(torch.zeros(2, 6, 6, dtype=torch.long))
    first_inputs: set = set()
    for attempt in range(2):  # the second sample reads its weights and caches from the same tensors
        with torch.inference_mode():
            graph, _ = run(sampler, Context(), sample_uniforms(4, 0, 2, 36), known,
                           torch.zeros_like(known, dtype=torch.bool))
        assert torch.equal(prior.public(graph), prior.sample(2, seed=4))
        fixed_inputs = set(sampler.graph_pool)
        if attempt:  # the pool only grows, so the same keys are the same tensors
            assert fixed_inputs == first_inputs
        first_inputs = fixed_inputs


def test_sampling_follows_the_weights_after_a_fused_optimizer_step():
    """A fused AdamW step (and an edit through .data) changes the weights without bumping their version
    counters; sampling and log_prob after it must use the new weights, in float64 and float32."""
    prior = trained_scale_prior(6, num_layers=4)
    codes = prior.sample(12, seed=1)
    before = prior.log_prob(codes)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-2, fused=True)
    for _ in range(5):
        prior.nll(codes).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        prior.head.out.bias.data[0] += 3.0
    fresh = Prior.from_config(prior.config)
    fresh.load_state_dict(prior.state_dict())
    fresh.eval()
    prior.eval()
    after = prior.log_prob(codes)
    assert not torch.allclose(after, before)
    assert torch.allclose(after, fresh.log_prob(codes), rtol=0, atol=1e-9)
    for precision in ("float64", "float32"):
        assert torch.equal(prior.sample(24, seed=2, precision=precision), fresh.sample(24, seed=2, precision=precision))


def test_sampling_keeps_nothing_on_the_model():
    """No float64 twin, tolerance or graph tensors hide in the model after sampling: torch.save sizes and
    the module's attributes are as they were."""
    prior = trained_scale_prior(6, num_layers=3)

    def saved_size() -> int:
        buffer = io.BytesIO()
        torch.save(prior, buffer)
        return len(buffer.getvalue())

    size, attributes = saved_size(), set(prior.__dict__)
    prior.sample(4, seed=0, precision="float32")
    prior.log_prob(prior.sample(2, seed=0))
    prior.beam_search(1, num_beams=2)
    assert saved_size() == size and set(prior.__dict__) == attributes


def test_a_kept_sampler_draws_what_sample_draws(prior8):
    sampler = Sampler(prior8, SamplingOptions(precision="float32", top_k=40))
    assert torch.equal(prior8.sample(8, seed=3, sampler=sampler), prior8.sample(8, seed=3, precision="float32", top_k=40))
    assert torch.equal(prior8.sample(4, seed=3, sample_offset=4, sampler=sampler), prior8.sample(8, seed=3, sampler=sampler)[4:])
    with pytest.raises(ValueError, match="pass either options or the sampling keywords"):
        prior8.sample(2, seed=3, sampler=sampler, top_p=0.5)


def test_a_kept_sampler_holds_the_weights_it_was_made_from():
    """A Sampler you keep copies the weights (its tolerance was measured on them): after the prior's weights
    change, it still draws the old weights' codes, in float32 as in float64; a new sampler draws the new ones."""
    prior = trained_scale_prior(4, num_layers=4)
    for precision in ("float32", "float64"):
        kept = Sampler(prior, SamplingOptions(precision=precision))
        before = prior.sample(16, seed=3, precision=precision)
        snapshot = {name: tensor.clone() for name, tensor in prior.state_dict().items()}
        with torch.no_grad():
            for parameter in prior.parameters():
                parameter.add_(0.02 * torch.randn_like(parameter))
        after = prior.sample(16, seed=3, precision=precision)
        assert not torch.equal(after, before)
        assert torch.equal(prior.sample(16, seed=3, sampler=kept), before)
        assert torch.equal(prior.sample(16, seed=3, sampler=Sampler(prior, SamplingOptions(precision=precision))),
                           after)
        prior.load_state_dict(snapshot)


@pytest.mark.parametrize("options", [dict(), dict(top_p=0.9), dict(top_k=5), dict(temperature=0.5, top_p=0.5),
                                     dict(strategy="greedy"), dict(temperature=2.0, top_k=30, top_p=0.8)],
                         ids=["plain", "top_p", "top_k", "t0.5 top_p", "greedy", "t2 top_k top_p"])
@pytest.mark.parametrize("error", [1e-3, 1e-2])
def test_every_decision_an_error_could_flip_is_flagged(options, error):
    """The guard's bounds (stage2_prior/decoding/guard.py): for random logits moved by at most `error` each,
    at random and at the worst corners (+error on the drawn code's side, -error elsewhere, and the reverse),
    every decision that changes was flagged unsure."""
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 20000, 12
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3
    uniforms = torch.rand(rows, generator=generator, dtype=torch.float64)
    built = SamplingOptions.build(**options)
    codes, unsure = decide(logits, uniforms, built, error)
    drawn = torch.nn.functional.one_hot(codes, vocab).double()
    noise = (torch.rand(rows, vocab, generator=generator, dtype=torch.float64) * 2 - 1) * error
    for moved in (logits + noise, logits + error * (2 * drawn - 1), logits - error * (2 * drawn - 1),
                  logits + error * torch.sign(torch.randn(rows, vocab, generator=generator, dtype=torch.float64))):
        flipped = decide(moved, uniforms, built, None)[0] != codes
        assert not (flipped & ~unsure).any(), f"{int((flipped & ~unsure).sum())} flips were not flagged"
    assert unsure.double().mean() < 0.5  # and the guard does not flag everything


def test_the_batched_exact_decision_equals_each_sample_decided_alone(prior8):
    """Sampler.exact_codes decides many flagged draws in one float64 forward, then alone those float64
    rounding could still flip: the same codes as deciding each draw alone, for draws at different positions."""
    from stage2_prior.decoding.guard import canonical_logits

    sampler = Sampler(prior8, SamplingOptions(top_p=0.9))
    grids = prior8.stacked(prior8.sample(12, seed=7))
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([torch.randint(0, 8, (12,), generator=generator), torch.randint(0, 8, (12,), generator=generator),
                         torch.zeros(12, dtype=torch.long)], dim=1)
    uniforms = torch.rand(12, generator=generator, dtype=torch.float64)
    context = Context()
    with torch.inference_mode():
        together = sampler.exact_codes(grids, context, draws, uniforms)
        alone = torch.stack([decide(canonical_logits(sampler.double, grids[k:k + 1], context, draws[k:k + 1],
                                                     sampler.options, alone=True), uniforms[k:k + 1],
                                    sampler.options, None)[0][0] for k in range(12)])
    assert torch.equal(together, alone) and sampler.recomputed == 12
