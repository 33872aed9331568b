"""Face-recognition training through Ray Train on a local Ray: loss, resume after SIGKILL, determinism, export."""

from __future__ import annotations

import io
import json
import os
import signal

import numpy as np
import pytest
import ray.train
import torch

from facesynth import storage
from facesynth.config import to_yaml
from jobs.train_fr import main
from recog.train.loop import STATE_FILE
from recog.train.trainer import run as train_fr
from tests.test_train_fixtures import tiny_config, write_faces

torch.set_num_threads(2)


class KillAtStep(ray.train.UserCallback):
    """On the Ray Train controller: SIGKILL the worker of world rank ``rank`` after step ``step``, once."""

    def __init__(self, step: int, rank: int, flag: str):
        self.step, self.rank, self.flag = step, rank, flag

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and metrics[0]["step"] == self.step and not os.path.exists(self.flag):
            pid = metrics[self.rank]["pid"]
            with open(self.flag, "w") as f:
                f.write(str(pid))
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return write_faces(str(tmp_path_factory.mktemp("faces") / "ds"), identities=8, samples=8)


def _state(result, step: int, name: str = STATE_FILE) -> dict:
    path = os.path.join(result.checkpoint_uri, f"checkpoint-{step:08d}", name)
    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_workers_loss_falls_survive_sigkill_and_rerun_resumes(ray_local, faces, tmp_path):
    out = str(tmp_path / "run")
    cfg = tiny_config(out, [faces], "scaling.num_workers=2", "train.steps=12", "train.max_failures=2")
    flag = str(tmp_path / "killed")
    result = train_fr(cfg, callbacks=[KillAtStep(step=8, rank=1, flag=flag)])
    assert os.path.exists(flag)  # a worker was SIGKILLed after the step-8 checkpoint ...
    assert result.steps == 12 and [h["step"] for h in result.history] == [
        2,
        4,
        6,
        8,
        10,
        12,
    ]  # ... and resumed
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    assert result.num_classes == 8

    spec = json.loads(storage.read_bytes(f"{out}/model/model.json"))
    assert spec == {
        "format": "torchscript",
        "file": "model.pt",
        "input_size": [32, 32],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "channel_order": "RGB",
        "embedding_dim": 32,
        "flip_fusion": "sum",
    }
    model = torch.jit.load(io.BytesIO(storage.read_bytes(f"{out}/model/model.pt")))
    state = _state(result, 12)
    assert state["step"] == 12 and state["world_size"] == 2
    from recog.train.loop import build_model

    eager = build_model(cfg, 8)
    eager.load_state_dict(state["backbone"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager.eval()(x))
    labels = json.loads(storage.read_bytes(f"{out}/labels.json"))
    assert labels["class_identity"] == [[faces, i] for i in range(8)]
    assert "final loss" in storage.read_bytes(f"{out}/report.md").decode()
    assert storage.exists(f"{out}/config.yaml") and storage.exists(f"{out}/loss.png")

    again = train_fr(cfg)  # the same run name after completion: resumes at the end, trains nothing
    assert again.steps == 12 and again.history == result.history


def test_same_seed_same_weights_on_one_worker(ray_local, faces, tmp_path):
    runs = [
        train_fr(
            tiny_config(
                str(tmp_path / f"run{k}"),
                [faces],
                "train.steps=6",
                "optim.ema_decay=0.9",
                "data.augment=[{name: flip}, {name: rotate}, {name: grayscale}]",
            )
        )
        for k in range(2)
    ]
    a, b = (_state(r, 6) for r in runs)
    heads = [_state(r, 6, "rank0.pt")["head"] for r in runs]
    assert a["backbone"].keys() == b["backbone"].keys()
    assert all(torch.equal(a["backbone"][k], b["backbone"][k]) for k in a["backbone"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert torch.equal(heads[0]["weight"], heads[1]["weight"])
    assert runs[0].history == [
        {**h, "images_per_s": runs[0].history[i]["images_per_s"]} for i, h in enumerate(runs[1].history)
    ]


def test_job_trains_a_closed_set_resnet18_classifier(ray_local, faces, tmp_path, capsys):
    out = str(tmp_path / "closed")
    cfg = tiny_config(
        out,
        [faces],
        "model.task=closed_set",
        "model.backbone=resnet18",
        "model.width=1.0",
        "optim.name=adam",
        "optim.lr=0.001",
        "optim.weight_decay=0",
        "data.augment=[{name: flip}, {name: rotate}, {name: color_jitter}, {name: grayscale}]",
    )
    (tmp_path / "closed.yaml").write_text(to_yaml(cfg))
    assert main(["--config", str(tmp_path / "closed.yaml"), "train.steps=4"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{\n") + 1 :] if "\n{\n" in printed else printed)
    assert summary["steps"] == 4 and summary["num_classes"] == 8 and summary["model_uri"] == f"{out}/model"
    spec = json.loads(storage.read_bytes(f"{out}/model/classifier.json"))
    assert spec["num_classes"] == 8 and spec["class_identity"] == [[faces, i] for i in range(8)]
    model = torch.jit.load(io.BytesIO(storage.read_bytes(f"{out}/model/model.pt")))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 8)


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_uninterrupted_weights(ray_local, faces, tmp_path):
    plain = train_fr(tiny_config(str(tmp_path / "plain"), [faces], "train.steps=8"))
    flag = str(tmp_path / "killed")
    killed = train_fr(
        tiny_config(str(tmp_path / "killed_run"), [faces], "train.steps=8"),
        callbacks=[KillAtStep(step=4, rank=0, flag=flag)],
    )
    assert os.path.exists(flag)
    a, b = _state(plain, 8), _state(killed, 8)
    assert all(torch.equal(a["backbone"][k], b["backbone"][k]) for k in a["backbone"])


@pytest.mark.slow  # two more Ray Train runs (~90 s on 2 busy cores)
def test_ddp_and_deepspeed_losses_agree(ray_local, faces, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install -e .[deepspeed])")
    common = ["train.steps=4", "train.log_every=1", "optim.grad_clip=null", "data.augment=[]"]
    ddp = train_fr(tiny_config(str(tmp_path / "ddp"), [faces], *common))
    zero = train_fr(
        tiny_config(
            str(tmp_path / "zero"), [faces], *common, "train.strategy=deepspeed", "train.zero_stage=1"
        )
    )
    np.testing.assert_allclose([h["loss"] for h in zero.history], [h["loss"] for h in ddp.history], rtol=1e-4)
