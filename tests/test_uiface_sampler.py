"""UIFace sampling, attention injection and synthetic identities (CPU, tiny random-weight model)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor
from pydantic import ValidationError

from synthgen.uiface.attention import (
    AttentionControl,
    UIFaceAttnProcessor,
    adain_logits,
    combine_attention_maps,
    cross_attention_map,
)
from synthgen.uiface.identities import sample_identities
from synthgen.uiface.model import build_uiface, preset
from synthgen.uiface.sampler import SamplerConfig, adaptive_switch, build_scheduler, sample, sample_latents

torch.set_num_threads(2)

STEPS = 5  # DDIM timesteps 800, 600, 400, 200, 0
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def model(request):
    torch.manual_seed(0)
    return build_uiface(preset("tiny", prediction_type=request.param)).eval()


@pytest.fixture(scope="module")
def eps_model():
    """The epsilon model alone, for properties that do not depend on the prediction type."""
    torch.manual_seed(0)
    return build_uiface(preset("tiny", prediction_type="epsilon")).eval()


@pytest.fixture(scope="module")
def embeddings():
    return torch.randn(len(SEEDS), 512, generator=torch.Generator().manual_seed(1))


def config(**overrides) -> SamplerConfig:
    return SamplerConfig(**{"steps": STEPS, "injection": False, **overrides})


def seeded_noise(model, seeds):
    return torch.stack(
        [torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


@torch.no_grad()
def plain_ddim(model, embeddings, seeds, guidance=None, empty_steps=None):
    """Reference loop on diffusers' DDIMScheduler: CFG with the identity context (guidance set), the empty
    context (guidance None), or ``empty_steps`` steps of empty context then identity without CFG."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False,
        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
        prediction_type=model.config.prediction_type,
    )  # fmt: skip
    scheduler.set_timesteps(STEPS)
    x = seeded_noise(model, seeds)
    identity = model.context.contexts(embeddings)
    empty = model.context.empty_contexts(len(seeds))
    for i, t in enumerate(scheduler.timesteps):
        if empty_steps is not None:
            pred = model.predict(x, t, empty if i < empty_steps else identity)
        elif guidance is None:
            pred = model.predict(x, t, empty)
        else:
            cond, uncond = model.predict(x, t, identity), model.predict(x, t, empty)
            pred = (1 + guidance) * cond - guidance * uncond
        x = scheduler.step(pred, t, x).prev_sample
    return x


def test_scheduler_grid_matches_reference(model):
    scheduler = build_scheduler(model, SamplerConfig())
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(980, -1, -20))
    assert scheduler.final_alpha_cumprod.item() == 1.0


@pytest.mark.parametrize(
    "overrides",
    [
        {"mode": "fixed", "t0": 999},
        {"mode": "fixed", "t0": 800},
        {"mode": "adaptive", "step_th": 1000},
        {"mode": "single"},
    ],
)
def test_immediate_switch_equals_conditional_ddim(model, embeddings, overrides):
    latents, t0 = sample_latents(model, config(guidance=1.5, **overrides), embeddings, SEEDS)
    expected = plain_ddim(model, embeddings, SEEDS, guidance=1.5)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    assert t0.tolist() == ([-1] * 3 if overrides["mode"] == "single" else [800] * 3)


@pytest.mark.parametrize(
    "overrides", [{"mode": "fixed", "t0": -1}, {"mode": "adaptive", "step_th": -1, "threshold": 0.0}]
)
def test_switch_never_taken_equals_empty_context_ddim(model, embeddings, overrides):
    latents, t0 = sample_latents(model, config(**overrides), embeddings, SEEDS)
    expected = plain_ddim(model, embeddings, SEEDS)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    assert t0.tolist() == [-1] * 3
    conditioned = plain_ddim(model, embeddings, SEEDS, guidance=1.0)
    assert (expected - conditioned).abs().max() > 1e-2  # the context matters, so the checks above are sharp


def test_adaptive_stage_one_conditions_switched_samples_without_cfg(model, embeddings):
    # step 1 only records a map; at step 2 every change is below the threshold, so step 3 (t=400) is the
    # first conditioned one; stage 2 (CFG) never starts
    overrides = {"mode": "adaptive", "step_th": -1, "threshold": 1e9}
    latents, t0 = sample_latents(model, config(**overrides), embeddings, SEEDS)
    expected = plain_ddim(model, embeddings, SEEDS, empty_steps=2)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    assert t0.tolist() == [400] * 3


def test_adaptive_rule_switches_at_first_small_change():
    threshold = 0.006
    # per-sample mean |A_t - A_prev| along 6 steps (step 0 has no predecessor): sample 0 settles at step 2,
    # sample 1 at step 4 (and changes again later: the switch is permanent), sample 2 never
    changes = torch.tensor(
        [
            [0.0, 0.2, 0.005, 0.3, 0.3, 0.3],
            [0.0, 0.1, 0.05, 0.007, 0.0059, 0.5],
            [0.0, 0.1, 0.1, 0.1, 0.1, 0.1],
        ]
    )
    maps = [torch.zeros(3, 4, 4)]
    for step in range(1, 6):
        maps.append(maps[-1] + changes[:, step, None, None])  # constant shift: mean abs change = changes
    switched = torch.zeros(3, dtype=torch.bool)
    first = [-1, -1, -1]
    previous = None
    for step, current in enumerate(maps):
        switched = adaptive_switch(previous, current, switched, threshold)
        previous = current
        for i in range(3):
            if switched[i] and first[i] < 0:
                first[i] = step
    assert first == [2, 4, -1]
    assert switched.tolist() == [True, True, False]


def test_adain_strength_zero_is_identity_and_one_gives_source_statistics():
    g = torch.Generator().manual_seed(0)
    logits, source = torch.randn(6, 10, 7, generator=g), 3 * torch.randn(6, 10, 7, generator=g) + 2
    torch.testing.assert_close(adain_logits(logits, source, 0.0), logits)
    full = adain_logits(logits, source, 1.0)
    torch.testing.assert_close(full.mean(-1), source.mean(-1))
    torch.testing.assert_close(full.std(-1), source.std(-1))
    half = adain_logits(logits, source, 0.5)
    torch.testing.assert_close(half.mean(-1), (logits.mean(-1) + source.mean(-1)) / 2)
    torch.testing.assert_close(half.std(-1), (logits.std(-1) + source.std(-1)) / 2)
    # shape within a row is kept: the standardised rows agree
    z = (half - half.mean(-1, keepdim=True)) / half.std(-1, keepdim=True)
    torch.testing.assert_close(z, (logits - logits.mean(-1, keepdim=True)) / logits.std(-1, keepdim=True))


def _attention(cross_dim=None):
    torch.manual_seed(3)
    attn = Attention(query_dim=16, heads=2, dim_head=8, cross_attention_dim=cross_dim)
    attn.set_processor(UIFaceAttnProcessor())
    return attn


def _heads(attn, x, w):  # (B, L, C) -> (B*heads, L, d)
    return attn.head_to_batch_dim(x @ w.T)


def test_self_injection_uses_source_logits_and_own_values():
    attn = _attention()
    hidden = torch.randn(4, 9, 16)  # [source(2); target(2)]
    out = attn(hidden, control=AttentionControl(paired=True, self_injection=True))
    q, k = _heads(attn, hidden, attn.to_q.weight), _heads(attn, hidden, attn.to_k.weight)
    v = _heads(attn, hidden, attn.to_v.weight)
    logits = q @ k.transpose(1, 2) / np.sqrt(8)
    source_logits = logits[:4]  # rows (sample, head) of the 2 source samples
    probs = torch.cat([source_logits, source_logits]).softmax(-1)
    expected = attn.to_out[0](attn.batch_to_head_dim(probs @ v))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    plain = attn(hidden)  # no control: diffusers' own processor path
    torch.testing.assert_close(plain[:2], out[:2], rtol=1e-5, atol=1e-5)
    assert (plain[2:] - out[2:]).abs().max() > 1e-3


def test_cross_injection_and_capture_against_formula():
    attn = _attention(cross_dim=12)
    hidden, context = torch.randn(4, 16, 16), torch.randn(4, 5, 12)
    control = AttentionControl(paired=True, cross_strength=0.3, capture_size=8)
    out = attn(hidden, encoder_hidden_states=context, control=control)
    q, k = _heads(attn, hidden, attn.to_q.weight), _heads(attn, context, attn.to_k.weight)
    v = _heads(attn, context, attn.to_v.weight)
    logits = q @ k.transpose(1, 2) / np.sqrt(8)
    source, target = logits[:4], logits[4:]
    mixed = adain_logits(target, source, 0.3)
    expected = attn.to_out[0](attn.batch_to_head_dim(torch.cat([source, mixed]).softmax(-1) @ v))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(control.maps) == 1
    torch.testing.assert_close(control.maps[0], cross_attention_map(target, heads=2, size=8))
    default = AttnProcessor()(attn, hidden, context)
    torch.testing.assert_close(attn(hidden, encoder_hidden_states=context), default, rtol=1e-5, atol=1e-5)


def test_cross_attention_map_and_combination_formula():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2 * 3, 4, 5, generator=g)  # 2 samples, 3 heads, 2x2 queries, 5 keys
    m = cross_attention_map(logits, heads=3, size=2)
    per_query = logits.view(2, 3, 4, 5).softmax(dim=2).mean(dim=3).mean(dim=1)  # (2, 4)
    torch.testing.assert_close(m, (per_query / per_query.max(1, keepdim=True).values).view(2, 2, 2))
    up = cross_attention_map(logits, heads=3, size=4)
    assert up.shape == (2, 4, 4) and up.min() >= 0 and up.max() <= 1
    combined = combine_attention_maps([m, 0.5 * m])
    mean = 0.75 * m
    lo, hi = mean.flatten(1).min(1).values, mean.flatten(1).max(1).values
    torch.testing.assert_close(combined, (mean - lo[:, None, None]) / (hi - lo)[:, None, None])
    assert combined.flatten(1).min(1).values.tolist() == [0.0, 0.0]
    assert combined.flatten(1).max(1).values.tolist() == [1.0, 1.0]


def test_paired_call_with_equal_halves_matches_plain_unet(model, embeddings):
    x = seeded_noise(model, SEEDS)
    contexts = model.context.contexts(embeddings)
    control = AttentionControl(paired=True, self_injection=True, cross_strength=1.0)
    with torch.no_grad():
        paired = model.predict(torch.cat([x, x]), 500, torch.cat([contexts, contexts]), control)
        plain = model.predict(x, 500, contexts)
    torch.testing.assert_close(paired[3:], plain, rtol=1e-4, atol=1e-4)


def test_injection_changes_output(model, embeddings):
    off, _ = sample_latents(model, config(mode="single"), embeddings, SEEDS)
    on, _ = sample_latents(model, config(mode="single", injection=True), embeddings, SEEDS)
    assert (on - off).abs().max() > 1e-3


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "pndm"])
def test_sample_is_independent_of_batch_neighbours(eps_model, embeddings, scheduler):
    # adaptive with injection; this threshold lets the tiny model's samples switch at different stage-1 steps
    model = eps_model
    cfg = SamplerConfig(steps=8, scheduler=scheduler, threshold=0.045, step_th=100)
    batch, t0 = sample_latents(model, cfg, embeddings, SEEDS)
    alone, t0_alone = sample_latents(model, cfg, embeddings[1:2], SEEDS[1:2])
    swapped, t0_swapped = sample_latents(model, cfg, embeddings[[2, 1]], [SEEDS[2], SEEDS[1]])
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(swapped[1], batch[1], rtol=1e-4, atol=1e-4)
    assert t0_alone[0] == t0[1] == t0_swapped[1]
    assert set(t0.tolist()) <= set(build_timesteps(model, cfg))
    if scheduler != "pndm":  # PNDM's warm-up repeats a timestep, so every sample switches right there
        assert len(set(t0.tolist())) > 1


def build_timesteps(model, cfg):
    scheduler = build_scheduler(model, cfg)
    scheduler.set_timesteps(cfg.steps)
    return [t for t in scheduler.timesteps.tolist() if t >= 0]


def test_sample_decodes_uint8_images(model, embeddings):
    out = sample(model, config(mode="fixed", t0=500, eta=0.5), embeddings[:2], SEEDS[:2])
    assert out.images.dtype == torch.uint8 and out.images.shape == (2, 32, 32, 3)
    assert out.t0.tolist() == [400, 400]
    again = sample(model, config(mode="fixed", t0=500, eta=0.5), embeddings[:2], SEEDS[:2])
    assert torch.equal(out.images, again.images)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"guidance": -0.5}, "guidance"),
        ({"eta": 0.5, "scheduler": "pndm"}, "eta"),
        ({"mode": "two-stage"}, "mode"),
        ({"cross_strength": 1.5}, "cross_strength"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_sampler_config_names_the_key(overrides, key):
    with pytest.raises(ValidationError, match=key):
        SamplerConfig(**overrides)


def test_sample_rejects_mismatched_seeds(model, embeddings):
    with pytest.raises(ValueError, match="seeds: expected one per id_embeddings row"):
        sample_latents(model, config(), embeddings, SEEDS[:2])


def test_identities_are_unit_separated_and_seeded():
    training = np.random.default_rng(0).standard_normal((50, 16))
    ids = sample_identities(40, seed=3, dim=16, max_cosine=0.5, training=training)
    assert ids.shape == (40, 16) and ids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ids, axis=1), 1.0, rtol=1e-6)
    cos = ids @ ids.T
    assert cos[~np.eye(40, dtype=bool)].max() <= 0.5 + 1e-6
    unit_training = training / np.linalg.norm(training, axis=1, keepdims=True)
    assert (ids @ unit_training.T).max() <= 0.5 + 1e-6
    np.testing.assert_array_equal(
        ids, sample_identities(40, seed=3, dim=16, max_cosine=0.5, training=training)
    )
    assert not np.array_equal(ids, sample_identities(40, seed=4, dim=16, max_cosine=0.5, training=training))


def test_identity_rejection_discards_close_candidates():
    # without a threshold the first 20 candidates are accepted; with one, some are rejected and replaced
    free = sample_identities(20, seed=0, dim=8, max_cosine=1.0)
    strict = sample_identities(20, seed=0, dim=8, max_cosine=0.6)
    np.testing.assert_array_equal(free[0], strict[0])
    assert not np.array_equal(free, strict)
    assert (free @ free.T)[~np.eye(20, dtype=bool)].max() > 0.6
    assert (strict @ strict.T)[~np.eye(20, dtype=bool)].max() <= 0.6 + 1e-6


def test_identities_from_fitted_gaussian():
    rng = np.random.default_rng(1)
    training = rng.standard_normal((500, 8)) * 0.1 + np.eye(8)[0]  # clustered around e0
    ids = sample_identities(10, seed=0, dim=8, max_cosine=0.999, method="gaussian", training=training)
    assert ids[:, 0].mean() > 0.8  # drawn near the training distribution, unlike the sphere
    sphere = sample_identities(10, seed=0, dim=8, max_cosine=0.999)
    assert abs(sphere[:, 0].mean()) < 0.5


def test_identities_error_when_threshold_unreachable():
    with pytest.raises(ValueError, match=r"only \d+ of 10 identities with max_cosine=-0.9"):
        sample_identities(10, seed=0, dim=3, max_cosine=-0.9, max_tries=500)
    with pytest.raises(ValueError, match="training: method 'gaussian'"):
        sample_identities(2, seed=0, dim=3, method="gaussian")
