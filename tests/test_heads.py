"""Margin heads against the published formulas (float64 numpy references), Partial FC sampling, sharding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from recog.heads import AdaFaceMargin, CombinedMargin, _ShardedCrossEntropy, build_head

torch.set_num_threads(2)

S = 64.0


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def cross_entropy(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_prob[np.arange(len(labels)), labels].mean()


def with_target(cos, labels, target):
    out = cos.copy()
    out[np.arange(len(labels)), labels] = target
    return out


@pytest.fixture
def batch():
    """6 embeddings over 5 classes; row 5 points almost opposite its centre (cos < cos(pi - 0.5))."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(5, 8))
    labels = np.array([0, 1, 2, 3, 4, 2])
    emb = rng.normal(size=(6, 8)) * 3.0
    emb[:3] += 6.0 * unit(weight)[labels[:3]]
    emb[5] = -unit(weight)[2] * 4.0 + 0.05 * rng.normal(size=8)
    cos = unit(emb) @ unit(weight).T
    return emb, weight, labels, cos


def run_head(head, emb, weight, labels):
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight))
    x = torch.tensor(emb, dtype=torch.float32, requires_grad=True)
    out = head(x, torch.as_tensor(labels))
    return out, x


def test_fixture_reaches_the_fallback_branch(batch):
    _, _, labels, cos = batch
    target = cos[np.arange(6), labels]
    assert target[5] < math.cos(math.pi - 0.5) and (target[:5] > math.cos(math.pi - 0.5)).all()


def combined_reference(cos, m1=1.0, m2=0.0, m3=0.0):
    """ArcFace paper eq. 4 with the reference code's fallback past theta = (pi - m2) / m1."""
    theta = np.arccos(cos)
    fallback = cos - m3 - m2 * math.sin(math.pi - m2)
    return np.where(m1 * theta + m2 <= math.pi, np.cos(m1 * theta + m2) - m3, fallback)


@pytest.mark.parametrize(
    ("name", "margins"),
    [("arcface", {"m2": 0.5}), ("cosface", {"m3": 0.35}), ("combined", {"m1": 1.1, "m2": 0.3, "m3": 0.2})],
)
def test_cosine_margin_heads_match_formula(batch, name, margins):
    emb, weight, labels, cos = batch
    target = cos[np.arange(6), labels]
    got = CombinedMargin(**margins)(torch.tensor(target), torch.ones(6))
    reference = combined_reference(target, **margins)
    np.testing.assert_allclose(got.numpy(), reference, rtol=0, atol=1e-6)
    out, _ = run_head(build_head(name, embedding_dim=8, num_classes=5, **margins), emb, weight, labels)
    expected = cross_entropy(S * with_target(cos, labels, reference), labels)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(out.logits.numpy(), S * cos, rtol=1e-5, atol=1e-4)  # margin-free logits
    np.testing.assert_array_equal(out.labels.numpy(), labels)


def test_arcface_values_by_hand():
    cos = torch.tensor([1.0, 0.5, 0.0, -0.5, -0.9], dtype=torch.float64)
    got = CombinedMargin(m2=0.5)(cos, torch.ones(5))
    # cos(theta + m) = cos*cos(m) - sin*sin(m); the last one is below cos(pi - 0.5) = -0.8776
    expected = [
        math.cos(0.5),
        0.5 * math.cos(0.5) - math.sqrt(0.75) * math.sin(0.5),
        -math.sin(0.5),
        -0.5 * math.cos(0.5) - math.sqrt(0.75) * math.sin(0.5),
        -0.9 - 0.5 * math.sin(0.5),
    ]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_easy_margin_keeps_negative_cosines():
    cos = torch.tensor([0.8, 0.1, -0.2, -0.95], dtype=torch.float64)
    got = CombinedMargin(m2=0.5, easy_margin=True)(cos, torch.ones(4))
    expected = [math.cos(math.acos(0.8) + 0.5), math.cos(math.acos(0.1) + 0.5), -0.2, -0.95]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def adaface_reference(cos, norms, mean, std, m=0.4, h=0.333, eps=1e-3):
    scaler = np.clip((np.clip(norms, 0.001, 100) - mean) / (std + eps) * h, -1, 1)
    theta = np.arccos(np.clip(cos, -1 + eps, 1 - eps))
    return np.cos(np.clip(theta - m * scaler, eps, math.pi - eps)) - (m + m * scaler)


def test_adaface_matches_paper_and_tracks_norm_statistics(batch):
    emb, weight, labels, cos = batch
    norms = np.linalg.norm(emb, axis=1)
    head = build_head("adaface", embedding_dim=8, num_classes=5)
    mean, std = 20.0, 100.0
    for _ in range(2):  # EMA with momentum 0.01 from the published initial values (20, 100)
        mean = 0.99 * mean + 0.01 * norms.mean()
        std = 0.99 * std + 0.01 * norms.std(ddof=1)
        out, _ = run_head(head, emb, weight, labels)
    assert head.margin.batch_mean.item() == pytest.approx(mean, rel=1e-6)
    assert head.margin.batch_std.item() == pytest.approx(std, rel=1e-6)
    target = adaface_reference(cos[np.arange(6), labels], norms, mean, std)
    assert out.loss.item() == pytest.approx(
        cross_entropy(S * with_target(cos, labels, target), labels), rel=1e-5
    )


def test_adaface_scaler_saturates_and_eval_freezes_statistics():
    margin = AdaFaceMargin().eval()
    margin.batch_mean.fill_(10.0)
    margin.batch_std.fill_(2.0)
    cos = torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64)
    norms = torch.tensor([1.0, 10.0, 40.0], dtype=torch.float64)  # scaler -1, 0, +1 after the clip
    got = margin(cos, norms)
    theta = math.acos(0.3)
    expected = [math.cos(theta + 0.4) - 0.0, math.cos(theta) - 0.4, math.cos(theta - 0.4) - 0.8]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert (margin.batch_mean.item(), margin.batch_std.item()) == (10.0, 2.0)


def test_softmax_is_plain_linear(batch):
    emb, weight, labels, _ = batch
    out, _ = run_head(build_head("softmax", embedding_dim=8, num_classes=5), emb, weight, labels)
    np.testing.assert_allclose(out.logits.numpy(), emb @ weight.T, rtol=1e-5, atol=1e-4)
    assert out.loss.item() == pytest.approx(cross_entropy(emb @ weight.T, labels), rel=1e-5)


def test_sharded_cross_entropy_gradient():
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, 2, 2])
    assert torch.autograd.gradcheck(lambda z: _ShardedCrossEntropy.apply(z, labels, 1), (logits,))
    loss = _ShardedCrossEntropy.apply(logits, labels, 1)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))


def test_gradients_reach_embeddings_and_centres(batch):
    emb, weight, labels, _ = batch
    head = build_head("arcface", embedding_dim=8, num_classes=5)
    out, x = run_head(head, emb, weight, labels)
    out.loss.backward()
    assert x.grad.abs().min() > 0 and head.weight.grad.abs().sum(dim=1).min() > 0


def test_partial_fc_samples_positives_plus_negatives():
    torch.manual_seed(0)
    head = build_head("cosface", embedding_dim=8, num_classes=40, sample_rate=0.25)
    assert head.num_sample == 10
    emb, labels = torch.randn(6, 8), torch.tensor([3, 17, 17, 39, 0, 3])
    full = head.eval()(emb, labels)
    head.train()
    torch.manual_seed(1)
    index = head.sample_centres(labels)
    torch.manual_seed(1)
    out = head(emb, labels)
    assert index.numel() == 10 and set(labels.tolist()) <= set(index.tolist())
    assert torch.equal(index, index.unique())  # sorted, distinct
    assert torch.equal(index[out.labels], labels)
    torch.testing.assert_close(out.logits, full.logits[:, index])
    cos = full.logits.double().numpy()[:, index.numpy()] / S
    rows = np.arange(6)
    expected = cross_entropy(
        S * with_target(cos, out.labels.numpy(), cos[rows, out.labels.numpy()] - 0.4), out.labels.numpy()
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    touched = head.weight.grad.abs().sum(dim=1) > 0
    assert torch.equal(torch.nonzero(touched).squeeze(1), index)


def test_partial_fc_keeps_all_positives_beyond_the_sample_size():
    head = build_head("arcface", embedding_dim=4, num_classes=10, sample_rate=0.2)
    labels = torch.tensor([1, 4, 4, 7, 9])
    out = head(torch.randn(5, 4), labels)
    assert out.logits.shape == (5, 4)
    assert torch.equal(torch.tensor([1, 4, 7, 9])[out.labels], labels)


def test_sampling_that_keeps_every_class_equals_the_full_head(batch):
    emb, weight, labels, _ = batch
    full, _ = run_head(build_head("arcface", embedding_dim=8, num_classes=5), emb, weight, labels)
    sampled = build_head("arcface", embedding_dim=8, num_classes=5, sample_rate=0.2)  # 1 centre ...
    pfc, _ = run_head(sampled, emb, weight, labels)  # ... but every class of the batch is a positive
    assert pfc.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    assert torch.equal(pfc.logits, full.logits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"name": "sphereface"},
            r"'sphereface' is unknown.*'adaface', 'arcface', 'combined', 'cosface', 'softmax'",
        ),
        ({"name": "arcface", "m3": 0.2}, r"'arcface' takes only \['m2'\] margins, got \{'m3': 0.2\}"),
        ({"name": "cosface", "m2": 0.5}, "'cosface' takes only"),
        ({"name": "softmax", "easy_margin": True}, "plain linear"),
        ({"name": "arcface", "m2": 2.0}, "m2=2.0"),
        ({"name": "arcface", "sample_rate": 0.0}, "sample_rate=0.0"),
        ({"name": "arcface", "s": -1.0}, "s=-1.0"),
    ],
)
def test_bad_head_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_head(embedding_dim=4, num_classes=5, **kwargs)


def test_neutral_margins_are_accepted():
    head = build_head("cosface", embedding_dim=4, num_classes=5, m1=1.0, m2=0.0, m3=0.3)
    assert (head.margin.m1, head.margin.m2, head.margin.m3) == (1.0, 0.0, 0.3)


def test_bad_labels():
    head = build_head("arcface", embedding_dim=4, num_classes=5)
    with pytest.raises(ValueError, match=r"class ids in \[0, 5\), got 0..5"):
        head(torch.randn(2, 4), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"expected \(N, D\) and \(N,\)"):
        head(torch.randn(2, 4), torch.tensor([0, 1, 2]))


def _distributed_worker(rank, world_size, init_file, inputs, results):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    torch.set_num_threads(1)
    emb, labels, weight = inputs
    rows = slice(rank * 3, rank * 3 + 3)
    out = {}
    for name in ("arcface", "adaface"):
        head = build_head(name, embedding_dim=8, num_classes=7)
        with torch.no_grad():
            head.weight.copy_(weight[head.class_start : head.class_start + head.num_local])
        x = emb[rows].clone().requires_grad_(True)
        loss = head(x, labels[rows]).loss
        loss.backward()
        grads = (loss.detach(), x.grad, head.weight.grad)
        # numpy arrays are pickled by value; queued tensors share memory through this process, which may
        # have exited by the time the parent reads them (EOFError)
        out[name] = (head.class_start, head.num_local, *(t.numpy() for t in grads))
    results.put((rank, out))
    torch.distributed.destroy_process_group()


def test_two_ranks_match_a_single_full_head(tmp_path):
    torch.manual_seed(0)
    emb, labels, weight = torch.randn(6, 8) * 4, torch.tensor([0, 6, 3, 4, 4, 1]), torch.randn(7, 8)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_distributed_worker, args=(r, 2, tmp_path / "init", (emb, labels, weight), results)
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for name in ("arcface", "adaface"):
        head = build_head(name, embedding_dim=8, num_classes=7)
        with torch.no_grad():
            head.weight.copy_(weight)
        x = emb.clone().requires_grad_(True)
        loss = head(x, labels).loss
        loss.backward()
        assert [got[r][name][:2] for r in range(2)] == [(0, 4), (4, 3)]
        for r in range(2):
            start, n, *got_grads = got[r][name]
            rank_loss, x_grad, w_grad = (torch.from_numpy(g) for g in got_grads)
            torch.testing.assert_close(rank_loss, loss.detach())
            torch.testing.assert_close(x_grad, x.grad[r * 3 : r * 3 + 3])
            torch.testing.assert_close(w_grad, head.weight.grad[start : start + n])
