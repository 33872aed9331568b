"""UIFace model: config presets, identity context, training rules and loss (CPU, tiny random weights)."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from synthgen.uiface.context import IdentityContext, context_dropout, unconditional_mask
from synthgen.uiface.model import UIFaceModelConfig, build_uiface, build_unet, preset

torch.set_num_threads(2)

REFERENCE_UNET_PARAMS = 216_341_187  # TFace configs/model/unet_cond_ca_cpd25_uncond20.yaml


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_uiface(preset("tiny"))


def test_casia_preset_matches_reference_shapes_and_size():
    config = preset("uiface-casia")
    assert (config.image_size, config.latent_size, config.latent_channels) == (128, 32, 3)
    with torch.device("meta"):
        unet = build_unet(config)
    params = sum(p.numel() for p in unet.parameters())
    assert params == 221_450_787
    assert abs(params / REFERENCE_UNET_PARAMS - 1) < 0.03
    heads = [m.heads for n, m in unet.named_modules() if n.endswith("attn2")]
    # attention at 16^2, 8^2, 4^2 (2 down + 3 up blocks each) and in the middle block, all with head dim 32
    assert len(heads) == 3 * 2 + 3 * 3 + 1
    assert sorted(set(heads)) == [192 // 32, 384 // 32, 768 // 32]


def test_tiny_preset_is_small_and_pixel_space(tiny):
    assert tiny.autoencoder is None and tiny.latent_shape == (3, 32, 32)
    assert sum(p.numel() for p in tiny.parameters()) < 2_000_000


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"attention_levels": [False, True, True]}, "attention_levels"),
        ({"block_channels": [32, 60]}, "block_channels"),
        ({"image_size": 33}, "image_size"),
        ({"context_dropout": 1.0}, "context_dropout"),
        ({"beta_end": 1e-5}, "beta_end"),
        ({"unknown_key": 1}, "unknown_key"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValidationError, match=key):
        preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="uiface-casia"):
        preset("huge")


def test_tokens_follow_reference_layout():
    torch.manual_seed(1)
    ctx = IdentityContext(embedding_dim=6, context_dim=8, num_tokens=3, norm_groups=2)
    c = torch.randn(2, 8)
    tokens = ctx.tokens(c)
    assert tokens.shape == (2, 3, 8)
    raw = (
        c @ ctx.to_tokens.weight.T + ctx.to_tokens.bias
    )  # (2, 24), channel-major: index = channel * K + token
    expected = torch.empty(2, 3, 8)
    for b in range(2):
        for group in range(2):
            channels = range(group * 4, group * 4 + 4)
            values = torch.stack([raw[b, n * 3 : n * 3 + 3] for n in channels])  # (4 channels, 3 tokens)
            normed = (values - values.mean()) / torch.sqrt(values.var(unbiased=False) + ctx.norm.eps)
            for i, n in enumerate(channels):
                expected[b, :, n] = normed[i] * ctx.norm.weight[n] + ctx.norm.bias[n]
    torch.testing.assert_close(tokens, expected)


def test_contexts_are_scale_invariant_and_empty_replaces_rows():
    torch.manual_seed(2)
    ctx = IdentityContext(embedding_dim=5, context_dim=8, num_tokens=2, norm_groups=4)
    e = torch.randn(3, 5)
    torch.testing.assert_close(ctx.contexts(3.0 * e), ctx.contexts(e))
    torch.testing.assert_close(ctx.contexts(e), F.normalize(e, dim=1) @ ctx.embed.weight.T + ctx.embed.bias)
    mixed = ctx.contexts(e, use_identity=torch.tensor([True, False, True]))
    torch.testing.assert_close(mixed[1], ctx.empty)
    torch.testing.assert_close(mixed[[0, 2]], ctx.contexts(e)[[0, 2]])
    with pytest.raises(ValueError, match=r"id_embeddings: expected shape \(batch, 5\)"):
        ctx.contexts(torch.randn(3, 4))


def test_empty_context_init_is_standard_normal():
    torch.manual_seed(3)
    empty = IdentityContext(embedding_dim=4, context_dim=4096, num_tokens=1, norm_groups=1).empty
    assert abs(empty.mean().item()) < 0.05 and abs(empty.std().item() - 1) < 0.05


def test_unconditional_mask_rule():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert unconditional_mask(4, 0.2, g)[0]
    assert unconditional_mask(5, 0.0, None).tolist() == [True, False, False, False, False]
    assert unconditional_mask(5, 1.0, None).all()
    mask = unconditional_mask(20_000, 0.2, torch.Generator().manual_seed(0))
    assert abs(mask[1:].float().mean().item() - 0.2) < 0.01  # binomial std 0.003


def test_context_dropout_is_inverted_and_seeded():
    c = torch.ones(200, 256)
    out = context_dropout(c, 0.25, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs((out == 0).float().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(out, context_dropout(c, 0.25, torch.Generator().manual_seed(0)))
    assert context_dropout(c, 0.0, None) is c


@pytest.mark.parametrize(("p", "expected"), [(0.0, [True, False, False, False]), (1.0, [True] * 4)])
def test_training_loss_feeds_empty_tokens_to_unconditioned_samples(p, expected):
    torch.manual_seed(4)
    model = build_uiface(preset("tiny", uncond_prob=p, context_dropout=0.0))
    seen = {}
    model.unet.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.update(tokens=kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    model.training_loss(
        torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 512), torch.Generator().manual_seed(0)
    )
    empty_tokens = model.context.tokens(model.context.empty_contexts(1))[0]
    is_empty = [torch.allclose(t, empty_tokens, atol=1e-6) for t in seen["tokens"]]
    assert is_empty == expected


def test_training_loss_is_seeded_finite_and_falls():
    torch.manual_seed(5)
    model = build_uiface(preset("tiny"))
    images, embeddings = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 512)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = model.training_loss(images, embeddings, torch.Generator().manual_seed(7))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
    with pytest.raises(ValueError, match="images_or_latents"):
        model.training_loss(torch.zeros(4, 3, 16, 16), embeddings, None)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_loss_matches_published_target(prediction_type):
    """MSE against eps, v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022) or x0, written out."""
    torch.manual_seed(0)
    tiny = build_uiface(preset("tiny", prediction_type=prediction_type))
    images, embeddings = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 512)
    loss = tiny.training_loss(images, embeddings, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay the draws in training_loss order
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(images.shape, generator=g)
    keep = torch.rand(2, tiny.config.context_dim, generator=g) >= 0.25
    uncond = torch.rand(2, generator=g) < 0.2
    uncond[0] = True
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)[t].float()[:, None, None, None]
    noisy = alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise
    contexts = tiny.context.contexts(embeddings) * keep / 0.75
    contexts = torch.where(uncond[:, None], tiny.context.empty_contexts(2), contexts)
    out = tiny.unet(noisy, t, encoder_hidden_states=tiny.context.tokens(contexts)).sample
    target = {
        "epsilon": noise,
        "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * images,
        "sample": images,
    }[prediction_type]
    torch.testing.assert_close(loss, ((out - target) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_vq_latent_space_encodes_and_trains():
    torch.manual_seed(6)
    config = UIFaceModelConfig(
        **{**preset("tiny").model_dump(), "space": "vq", "autoencoder_channels": [16, 32]}
    )
    model = build_uiface(config)
    assert model.latent_shape == (3, 16, 16)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = model.encode(images)
    assert latents.shape == (2, 3, 16, 16)
    assert model.decode(latents).shape == (2, 3, 32, 32)
    embeddings = torch.randn(2, 512)
    from_images = model.training_loss(images, embeddings, torch.Generator().manual_seed(0))
    from_latents = model.training_loss(latents, embeddings, torch.Generator().manual_seed(0))
    assert torch.isfinite(from_images)
    torch.testing.assert_close(from_images, from_latents)
