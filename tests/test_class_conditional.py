"""The class-conditional baseline (the cross-domain study's first attempt): the UIFace UNet with a learned
embedding per class, selected in the model config, trained by the UIFace trainer and sampled by the UIFace
generator with class ids; (slow) trained on procedural people and judged by the cross-domain job."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facesynth import shards
from facesynth.config import ConfigError, load_config
from synthgen.generate import GenerateJob, plan
from synthgen.generate import run as generate
from synthgen.identity_embeddings import load_npy
from synthgen.uiface.model import preset
from synthgen.uiface.sampler import SamplerConfig, sample
from synthgen.uiface.train import UIFaceModelSource, UIFaceTrainJob
from synthgen.uiface.train import run as train
from tests.test_train_fixtures import write_faces

torch.set_num_threads(1)

CLASSES = {"conditioning": "class", "num_classes": 3, "image_size": 16, "prediction_type": "epsilon"}


def generate_config(output, *overrides: str, size: int = 16) -> GenerateJob:
    return load_config(
        GenerateJob,
        "uiface-tiny",
        [
            f"output={output}",
            f"generator.model.overrides={{conditioning: class, num_classes: 3, image_size: {size}}}",
            "generator.sampler={mode: single, steps: 3}",
            "identities.count=3",
            "identities.samples_per_identity=2",
            "identities.per_unit=3",
            "stage.commit_every_s=0",
            "use_ray=false",
            *overrides,
        ],
    )


def test_class_contexts_are_learned_rows_and_the_loss_and_sampler_take_class_ids():
    model = UIFaceModelSource(preset="tiny", overrides=CLASSES).build()
    ctx = model.context
    assert not hasattr(ctx, "embed") and ctx.classes.weight.shape == (3, 32)
    ids = torch.tensor([2, 0, 2])
    torch.testing.assert_close(ctx.contexts(ids), ctx.classes.weight[[2, 0, 2]])
    torch.testing.assert_close(ctx.contexts(ids, torch.tensor([True, False, True]))[1], ctx.empty)
    loss = model.training_loss(torch.rand(3, 3, 16, 16) * 2 - 1, ids, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0 and ctx.classes.weight.grad[1].abs().sum() == 0  # class 1 was not in the batch
    images = sample(model.eval(), SamplerConfig(mode="single", steps=2), ids, [1, 2, 1]).images
    assert images.shape == (3, 16, 16, 3) and torch.equal(images[0], images[2])  # same class, same seed
    with pytest.raises(ValueError, match=r"class ids: expected values in \[0, 3\), got 0..3"):
        ctx.contexts(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"class ids: expected integer shape \(batch,\)"):
        ctx.contexts(torch.randn(2, 512))
    with pytest.raises(ValueError, match=r"num_classes: 0 with conditioning='class'"):
        preset("tiny", conditioning="class")


def test_uiface_generator_samples_class_ids(tmp_path):
    out = str(tmp_path / "cls")
    result = generate(generate_config(out))
    assert result.rows == 6 and load_npy(f"{out}/identities.npy").tolist() == [0, 1, 2]
    rows = list(shards.iter_rows(out))
    assert sorted(r["identity"] for r in rows) == [0, 0, 1, 1, 2, 2]
    assert all(r.get("embedding") is None for r in rows)  # class-conditional rows carry no embedding
    with pytest.raises(
        ConfigError, match=r"identities.count: 4 identities, but the class-conditional model has 3"
    ):
        plan(generate_config(str(tmp_path / "x"), "identities.count=4"))


def test_training_refuses_identities_outside_the_classes_and_a_judge(tmp_path):
    faces = write_faces(str(tmp_path / "faces"), identities=4, samples=2)
    job = UIFaceTrainJob.model_validate(
        {"data": faces, "output": str(tmp_path / "out"), "model": {"preset": "tiny", "overrides": CLASSES}}
    )
    with pytest.raises(
        ValueError, match=r"identities \[3\] are not class ids in \[0, 3\); set .*num_classes >= 4"
    ):
        train(job)
    with pytest.raises(ValueError, match=r"judge: .*uses no judge; set judge: null"):
        train(job.model_copy(update={"judge": str(tmp_path)}))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_class_conditional_baseline_trains_generates_and_runs_through_the_cross_domain_job(
    ray_local, tmp_path
):
    from recog.cross_domain import CrossDomainJob
    from recog.cross_domain import run as cross_domain

    real = write_faces(str(tmp_path / "real"), identities=3, samples=8)  # 32 px
    trained = train(
        UIFaceTrainJob.model_validate(
            {
                "data": real,
                "output": str(tmp_path / "ddpm"),
                "model": {"preset": "tiny", "overrides": {**CLASSES, "image_size": 32}},
                "train": {
                    "steps": 4,
                    "batch_size": 8,
                    "log_every": 2,
                    "checkpoint_every": 4,
                    "shuffle_buffer": 0,
                },
            }
        )
    )
    assert trained.steps == 4
    synthetic = str(tmp_path / "syn")
    generate(
        generate_config(
            synthetic,
            f"generator.model.uri={trained.model_uri}",
            "identities.samples_per_identity=8",
            size=32,
        )
    )
    result = cross_domain(
        load_config(
            CrossDomainJob,
            None,
            [
                f"real={real}",
                f"synthetic={synthetic}",
                f"output={tmp_path / 'cd'}",
                "test_fraction=0.25",
                "model.input_size=32",
                "data.augment=[]",
                "data.shuffle_buffer=16",
                "train.steps=4",
                "train.batch_size=8",
                "train.checkpoint_every=4",
                "train.log_every=2",
            ],
        )
    )
    assert result.info["identities"] == [0, 1, 2] and len(result.info["experiments"]) == 6
    assert all(np.isfinite(e["accuracy"]) for e in result.info["experiments"])
