"""UIFace training on Ray Train (CPU, tiny 16 px model): loss falls, EMA model round-trips, resume continues."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from facesynth import shards, storage
from synthgen.identity_embeddings import embedded_dataset, load_npy
from synthgen.stage import Generated, Generator, StageConfig, run_plain
from synthgen.uiface.model import preset
from synthgen.uiface.sampler import SamplerConfig, sample
from synthgen.uiface.train import (
    STATE_FILE,
    UIFaceModelSource,
    UIFaceTrainJob,
    check_inputs,
    load_uiface,
    prepare_batch,
    save_uiface,
    step_seed,
)
from synthgen.uiface.train import run as train

torch.set_num_threads(2)

DIM = 16
# epsilon: the 40-step test below checks that the noise-prediction MSE falls by 40% (a v model's loss fell
# to 0.71x of its start in those 40 steps; the v target's formula is checked in test_uiface_model)
ARCH = {"image_size": 16, "embedding_dim": DIM, "prediction_type": "epsilon"}
IDENTITY_VECTORS = np.random.default_rng(5).standard_normal((4, DIM)).astype(np.float32)


class Patterns(Generator):
    """Identity i: a fixed colour blob pattern; samples jitter it. Embedding: the identity's fixed vector."""

    name, domain = "patterns", "render"

    def generate(self, identities, samples, seeds):
        images = []
        for i, s in zip(identities, seeds):
            base = np.random.default_rng(int(i)).integers(0, 256, (4, 4, 3)).repeat(5, 0).repeat(5, 1)
            shift = np.random.default_rng(int(s)).integers(0, 3, 2)
            images.append(np.roll(base, tuple(shift), (0, 1))[:20, :20].astype(np.uint8))
        n = len(identities)
        return Generated(
            images=np.stack(images),
            identity_names=[f"p{i}" for i in identities],
            prompts=[""] * n,
            params=[{}] * n,
            embeddings=IDENTITY_VECTORS[identities],
        )


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("faces") / "ds")
    run_plain(
        shards.plan_units(4, 8, 2), Patterns, uri, base_seed=1, cfg=StageConfig(batch_size=16), settings={}
    )
    return uri


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """An exported judge: TorchScript pooled-colour projection to DIM, input 24x24 (so images get resized)."""
    folder = tmp_path_factory.mktemp("judge")
    torch.manual_seed(0)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, DIM)).eval()
    torch.jit.save(torch.jit.script(net), str(folder / "model.pt"))
    spec = {
        "format": "torchscript",
        "file": "model.pt",
        "input_size": [24, 24],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "channel_order": "RGB",
        "embedding_dim": DIM,
        "flip_fusion": "sum",
    }
    (folder / "model.json").write_text(json.dumps(spec))
    return str(folder)


def job(data, output, **overrides) -> UIFaceTrainJob:
    train_cfg = {
        "batch_size": 8,
        "lr": 1e-3,
        "log_every": 2,
        "checkpoint_every": 10,
        "shuffle_buffer": 0,
        "cpus_per_worker": 0.5,
        "judge_batch_size": 16,
        **overrides.pop("train", {}),
    }
    return UIFaceTrainJob.model_validate(
        {
            "data": data,
            "output": output,
            "model": {"preset": "tiny", "overrides": ARCH},
            "train": train_cfg,
            **overrides,
        }
    )


def test_prepare_batch_scales_and_flips_with_the_generator():
    pixels = torch.arange(2 * 2 * 3 * 3, dtype=torch.uint8).view(2, 2, 3, 3) * 7
    g = torch.Generator().manual_seed(step_seed(0, 0, 5))
    flips = torch.rand(2, generator=torch.Generator().manual_seed(step_seed(0, 0, 5))) < 0.5
    out = prepare_batch(pixels, g)
    expected = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    for k in range(2):
        want = expected[k].flip(-1) if flips[k] else expected[k]
        assert torch.equal(out[k], want)
    assert out.min() >= -1 and out.max() <= 1
    assert step_seed(0, 0, 5) != step_seed(0, 1, 5) != step_seed(0, 0, 6)


def test_save_and_load_restore_identical_outputs(tmp_path):
    model = UIFaceModelSource(preset="tiny", overrides=ARCH, init_seed=3).build()
    with torch.no_grad():
        model.context.empty.add_(1.0)  # not the init value: the loader must restore the trained tensors
    save_uiface(model, str(tmp_path / "m"))
    loaded = load_uiface(str(tmp_path / "m"))
    assert loaded.config == model.config
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    cfg = SamplerConfig(mode="fixed", t0=500, steps=3)
    emb = torch.from_numpy(IDENTITY_VECTORS[:2])
    assert torch.equal(sample(model.eval(), cfg, emb, [1, 2]).images, sample(loaded, cfg, emb, [1, 2]).images)


def test_bad_inputs_fail_before_training(faces, judge):
    with pytest.raises(ValueError, match="embedding dim 16, but the model expects embedding_dim=512"):
        check_inputs(faces, None, preset("tiny"))
    with pytest.raises(ValueError, match="judge .*embedding dim 16, but the model expects embedding_dim=512"):
        check_inputs(faces, judge, preset("tiny"))
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        check_inputs(faces + "-missing", None, preset("tiny", **ARCH))
    with pytest.raises(ValueError, match="preset/overrides"):
        UIFaceModelSource(preset="tiny", overrides={"image_size": 15})


@pytest.mark.slow
def test_training_with_judge_lowers_loss_and_saves_the_ema_model(ray_local, faces, judge, tmp_path):
    """Two DDP workers (gloo), judge embeddings computed in Ray Data; the saved model is the EMA weights."""
    cfg = job(faces, str(tmp_path / "run"), judge=judge, train={"steps": 40, "num_workers": 2})
    result = train(cfg)
    assert (result.start_step, result.steps) == (0, 40)
    losses = [r["loss"] for r in result.loss_log]
    assert [r["step"] for r in result.loss_log] == list(range(2, 41, 2))
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses

    model = load_uiface(result.model_uri)
    state = torch.load(f"{result.checkpoint_uri}/{STATE_FILE}", weights_only=True)
    assert state["step"] == 40
    params = [*model.unet.parameters(), *model.context.parameters()]
    for p, shadow in zip(params, state["ema"]["shadow_params"], strict=True):
        assert torch.equal(p, shadow)
    assert not all(torch.equal(p, w) for p, w in zip(model.unet.parameters(), state["unet"].values()))
    ema = state["ema"]  # UIFace's EMA: warm-up 1 - (1 + step / inv_gamma) ** -power, capped at 0.9999
    assert (ema["optimization_step"], ema["inv_gamma"], ema["power"], ema["decay"]) == (40, 1.0, 0.75, 0.9999)
    assert ema["use_ema_warmup"]
    assert storage.exists(str(tmp_path / "run" / "report.md")) and storage.exists(
        str(tmp_path / "run" / "loss.png")
    )


@pytest.mark.slow
def test_rerun_resumes_from_the_checkpoint(ray_local, faces, tmp_path):
    """Shard embeddings, one worker: 4 steps, then a rerun with steps=6 continues from step 4."""
    first = train(job(faces, str(tmp_path / "run"), train={"steps": 4, "checkpoint_every": 2}))
    assert (first.start_step, first.steps) == (0, 4)
    again = train(job(faces, str(tmp_path / "run"), train={"steps": 6, "checkpoint_every": 2}))
    assert (again.start_step, again.steps) == (4, 6)
    assert [r["step"] for r in again.loss_log] == [2, 4, 6]
    assert again.loss_log[:2] == first.loss_log
    changed = job(faces, str(tmp_path / "run"), train={"steps": 8})
    changed.model.overrides["prediction_type"] = "sample"
    with pytest.raises(ValueError, match="prediction_type: 'epsilon' -> 'sample'"):
        train(changed)  # its checkpoints hold an epsilon model: resuming would train it toward another target
    # training identities for new-identity rejection: each identity's mean (here: its only) embedding
    unit = IDENTITY_VECTORS / np.linalg.norm(IDENTITY_VECTORS, axis=1, keepdims=True)
    np.testing.assert_allclose(load_npy(f"{again.model_uri}/identities.npy"), unit, rtol=1e-5, atol=1e-6)


def test_judge_embeddings_follow_the_model_contract(ray_local, faces, judge):
    """Resize to input_size, ((x/255)-mean)/std, sum of plain and flipped outputs, L2-normalised."""
    rows = list(shards.iter_rows(faces, columns=["image"]))[:5]
    out = embedded_dataset(faces, judge_uri=judge, judge_batch_size=4).take_batch(5, batch_format="numpy")
    pil = [Image.open(io.BytesIO(r["image"])).resize((24, 24), Image.Resampling.BILINEAR) for r in rows]
    x = (
        torch.from_numpy(np.stack([np.asarray(p) for p in pil])).permute(0, 3, 1, 2).float() / 255 - 0.5
    ) / 0.5
    net = torch.jit.load(f"{judge}/model.pt")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(net(x) + net(x.flip(-1)), dim=1).numpy()
    np.testing.assert_allclose(out["embedding"], expected, rtol=1e-5, atol=1e-6)
    assert out["embedding"].dtype == np.float32 and len(out["image"]) == 5
