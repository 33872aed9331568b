"""Stable Diffusion + LoRA (CPU, the tiny random-weight pipeline at 32 px): prompt sets, the offline tokenizer,
LoRA training (only adapters change, loss falls), the finetune_lora job on Ray Train (its LoRA loads into a plain
diffusers pipeline and gives our generator's image), generation rows, batch independence, bad inputs, and
(slow) exact resume after SIGKILL and the cross-domain job on the generated set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from facesynth import images, shards
from facesynth.config import ConfigError, load_config, to_yaml
from synthgen.generate import GenerateJob, plan
from synthgen.generate import run as generate
from synthgen.sd_lora.checkpoint import TinyPipeline, load_pipeline, save_tiny_pipeline
from synthgen.sd_lora.finetune import FinetuneLoraJob, LoraTrainConfig, LoraTraining
from synthgen.sd_lora.finetune import run as finetune
from synthgen.sd_lora.lora import WEIGHTS_FILE, LoraSettings, save_lora
from synthgen.sd_lora.prompts import PromptSet, read_prompt_set
from synthgen.sd_lora.tokenizer import clip_tokenizer
from synthgen.sd_lora.train_data import batch_rows, load_batch
from tests.conftest import ROOT
from tests.test_train_fixtures import write_faces

torch.set_num_threads(1)

PAPER = {  # shared/papers/cross-domain-face-classification.txt, STRATEGY
    "Gerardo": [
        "a selfie of a young man named Gerardo, curly black hair",
        "a selfie of a young man named Gerardo",
        "a selfie of a person Gerardo",
        "a picture of a person Gerardo",
        "a selfie of a young man named Gerardo, curly black hair, brown eyes, mexican looking",
    ],
    "Oliver": [
        "a selfie of a young man named Oliver, blonde hair",
        "a selfie of a young man named Oliver",
        "a selfie of a person Oliver",
        "a picture of a person Oliver",
        "a selfie of a young man named Oliver, blonde hair, blue eyes, european looking",
    ],
    "Timothy": [
        "a selfie of a young man named Timothy, long brown hair, bearded",
        "a selfie of a young man named Timothy",
        "a selfie of a person Timothy",
        "a picture of a person Timothy",
        "a selfie of a young man named Timothy, long brown hair, bearded, brown eyes, european looking",
    ],
}
TEMPLATE_IDS = ["named-hair", "named", "selfie-person", "picture-person", "named-detailed"]
SAMPLING = "{steps: 3, guidance_scale: 5.0, scheduler: ddim, resolution: 32}"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """The tiny pipeline saved as a diffusers folder (loaded through from_pretrained like a checkpoint)."""
    return save_tiny_pipeline(TinyPipeline(seed=0), str(tmp_path_factory.mktemp("base") / "tiny"))


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> str:
    return write_faces(str(tmp_path_factory.mktemp("faces") / "ds"), identities=3, samples=4)


def finetune_config(output, data: str, base: str, *overrides: str) -> FinetuneLoraJob:
    return load_config(
        FinetuneLoraJob,
        "finetune-lora-tiny",
        [
            f"output={output}",
            f"data.dataset={data}",
            "base.tiny=null",
            f"base.path={base}",
            "train.steps=6",
            "train.checkpoint_every=3",
            "train.log_every=1",
            "train.batch_size=2",
            *overrides,
        ],
    )


def generate_config(output, base: str, lora: str | None, *overrides: str) -> GenerateJob:
    return load_config(
        GenerateJob,
        "sd-lora-tiny",
        [
            f"output={output}",
            "generator.base.tiny=null",
            f"generator.base.path={base}",
            f"generator.lora={lora or 'null'}",
            "generator.images_per_template=1",
            "identities.samples_per_identity=5",
            f"generator.sampling={SAMPLING}",
            "stage.batch_size=4",
            "stage.commit_every_s=0",
            "use_ray=false",
            *overrides,
        ],
    )


# --- prompt sets and the tokenizer ----------------------------------------------------------------


def test_cross_domain_prompt_set_has_the_papers_strings_and_unknown_placeholders_fail():
    prompts = PromptSet.model_validate(read_prompt_set("cross-domain"))
    assert prompts.images_per_template == 50 and [t.id for t in prompts.templates] == TEMPLATE_IDS
    for p, (name, texts) in enumerate(PAPER.items()):
        rows = [prompts.row(p, s) for s in range(0, 250, 50)]
        assert [r[2] for r in rows] == texts and {r[0].name for r in rows} == {name}
    assert prompts.row(1, 249)[1].id == "named-detailed" and prompts.row(1, 200)[1].id == "named-detailed"
    bad = read_prompt_set("cross-domain")
    bad["templates"].append({"id": "style", "text": "a {style} portrait of {name}"})
    with pytest.raises(ValueError, match=r"id 'style'\) for Gerardo: unknown placeholder\(s\) \{style\}"):
        PromptSet.model_validate(bad)
    bad["templates"][-1] = {"id": "odd", "text": "a photo of {0}"}
    with pytest.raises(ValueError, match=r"placeholder \{0\}"):
        PromptSet.model_validate(bad)


def test_offline_tokenizer_gives_clips_ids_and_its_length():
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77


def test_batch_order_is_a_pure_function_of_step_rank_and_seed():
    one = np.concatenate([batch_rows(t, 0, 1, 4, 10, 3) for t in range(5)])  # two epochs of 10 rows
    assert sorted(one[:10]) == list(range(10)) and sorted(one[10:20]) == list(range(10))
    two = [np.concatenate([batch_rows(t, r, 2, 2, 10, 3) for r in range(2)]) for t in range(5)]
    np.testing.assert_array_equal(np.concatenate(two), one)  # 2 workers x 2 rows = 1 worker x 4 rows
    np.testing.assert_array_equal(batch_rows(3, 0, 1, 4, 10, 3), batch_rows(3, 0, 1, 4, 10, 3))


# --- LoRA training ---------------------------------------------------------------------------------


def test_lora_training_changes_only_lora_parameters_and_its_loss_falls(base):
    pipe = load_pipeline(base)
    frozen = {k: v.clone() for k, v in {**_prefixed(pipe, "unet"), **_prefixed(pipe, "vae")}.items()}
    text = {k: v.clone() for k, v in _prefixed(pipe, "text_encoder").items()}
    training = LoraTraining(pipe, LoraSettings(rank=4, alpha=4), LoraTrainConfig(lr=1e-2, seed=0))
    trainable = {k for k, p in pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    assert not any(p.requires_grad for p in [*pipe.vae.parameters(), *pipe.text_encoder.parameters()])
    assert {k.split(".", 1)[1] for k in training.params} == trainable
    rng = np.random.default_rng(0)
    table = _table(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), ["a", "b", "a", "b"])
    pixels, names = load_batch(table, np.arange(4), torch.Generator().manual_seed(0), flip=False)
    captions = [f"a photo of {n}" for n in names]

    def fixed_loss() -> float:  # the same images, noise and timesteps every time
        with torch.no_grad():
            losses = [
                training.loss(pixels, training.tokens(captions), torch.Generator().manual_seed(s))
                for s in range(4)
            ]
        return float(torch.stack(losses).mean())

    before = fixed_loss()
    start = {k: p.detach().clone() for k, p in training.params.items()}
    for step in range(
        40
    ):  # fit the fixed objective: a random-weight UNet starts at ~1.1 (predicting ~0 gives 1)
        training.step(training.loss, pixels, captions, torch.Generator().manual_seed(step % 4))
    assert fixed_loss() < 0.95 * before
    assert all(not torch.equal(start[k], p) for k, p in training.params.items() if ".lora_B." in k)
    unchanged = {
        k: v for k, v in {**_prefixed(pipe, "unet"), **_prefixed(pipe, "vae")}.items() if "lora_" not in k
    }
    assert {_base_key(k) for k in unchanged} == set(frozen)
    assert all(torch.equal(v, frozen[_base_key(k)]) for k, v in unchanged.items())
    assert all(torch.equal(v, text[k]) for k, v in _prefixed(pipe, "text_encoder").items())


def _prefixed(pipe, part: str) -> dict:
    return {f"{part}.{k}": v for k, v in getattr(pipe, part).state_dict().items()}


def _base_key(key: str) -> str:
    """peft wraps a targeted Linear: ``to_q.weight`` -> ``to_q.base_layer.weight``."""
    return key.replace(".base_layer.", ".")


def _table(pixels: np.ndarray, names: list[str]):
    import pyarrow as pa

    keys = [f"{k:04d}" for k in range(len(names))]
    return pa.table({"image": pa.array(images.encode(pixels), pa.binary()), "name": names, "key": keys})


# --- a LoRA in the diffusers format, and generation with it ---------------------------------------


@pytest.fixture(scope="module")
def lora(base, tmp_path_factory) -> str:
    """A LoRA trained in-process for a few steps and saved like the job saves it."""
    pipe = load_pipeline(base)
    training = LoraTraining(pipe, LoraSettings(), LoraTrainConfig(lr=1e-2, seed=0))
    rng = np.random.default_rng(1)
    table = _table(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), ["Oliver", "Timothy"])
    pixels, names = load_batch(table, np.arange(2), torch.Generator().manual_seed(0), flip=False)
    for step in range(3):
        training.step(
            training.loss, pixels, [f"a photo of {n}" for n in names], torch.Generator().manual_seed(step)
        )
    return save_lora(pipe, str(tmp_path_factory.mktemp("lora") / "lora"), {"steps": 3})


def test_saved_lora_loads_into_a_plain_diffusers_pipeline_and_gives_our_generators_image(
    lora, base, tmp_path
):
    from diffusers import StableDiffusionPipeline

    identity, sample, seed = 1, 3, 1234  # Oliver, template 3 ("a picture of a person Oliver")
    ours = plan(generate_config(str(tmp_path / "a"), base, lora)).factory()
    mine = ours.generate(np.array([identity]), np.array([sample]), np.array([seed])).images[0]

    plain = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(lora)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 5.0, "height": 32, "width": 32}
    theirs = plain("a picture of a person Oliver", generator=torch.Generator().manual_seed(seed), **kwargs)
    np.testing.assert_array_equal(mine, np.asarray(theirs.images[0]))
    plain.unload_lora_weights()  # the same pipeline without the LoRA draws another image
    untrained = plain("a picture of a person Oliver", generator=torch.Generator().manual_seed(seed), **kwargs)
    assert not np.array_equal(mine, np.asarray(untrained.images[0]))

    fused = plan(generate_config(str(tmp_path / "b"), base, lora, "generator.fuse_lora=true")).factory()
    folded = fused.generate(np.array([identity]), np.array([sample]), np.array([seed])).images[0]
    assert np.abs(folded.astype(int) - mine).max() <= 1  # W + BA folded into W: float rounding only


def test_generate_job_writes_a_row_per_identity_template_and_sample_with_prompt_and_template_id(
    lora, base, tmp_path
):
    out = str(tmp_path / "syn")
    result = generate(generate_config(out, base, lora))
    rows = sorted(shards.iter_rows(out), key=lambda r: (r["identity"], r["sample"]))
    assert result.rows == len(rows) == 15 and shards.verify(out) == []
    names = list(PAPER)
    for r in rows:
        params = json.loads(r["params"])
        assert r["identity_name"] == names[r["identity"]]
        assert r["prompt"] == params["prompt"] == PAPER[r["identity_name"]][r["sample"]]
        assert params["template_id"] == TEMPLATE_IDS[r["sample"]]
        assert (params["steps"], params["guidance_scale"], params["resolution"]) == (3, 5.0, 32)
        assert (
            params["scheduler"] == "DDIMScheduler"
            and r["domain"] == "diffusion"
            and r["generator"] == "sd_lora"
        )
        assert images.probe_size(r["image"], "row") == (32, 32)


def test_a_rows_image_does_not_depend_on_its_batch_neighbours(base, tmp_path):
    gen = plan(generate_config(str(tmp_path / "x"), base, None)).factory()
    ids, samples, seeds = np.array([0, 1, 2]), np.array([4, 0, 2]), np.array([11, 22, 33])
    batch = gen.generate(ids, samples, seeds)
    alone = gen.generate(ids[1:2], samples[1:2], seeds[1:2])
    np.testing.assert_array_equal(batch.images[1], alone.images[0])
    assert batch.prompts[1] == alone.prompts[0] == PAPER["Oliver"][0]
    assert not np.array_equal(batch.images[0], batch.images[1])


def test_bad_inputs_fail_before_anything_is_written(faces, base, tmp_path):
    out = tmp_path / "out"
    folder = tmp_path / "people"
    (folder / "Gerardo").mkdir(parents=True)
    (folder / "Gerardo" / "0.png").write_bytes(images.encode(np.zeros((1, 32, 32, 3), np.uint8))[0])
    (folder / "Oliver").mkdir()
    cases = [
        (
            ("data.dataset=null", f"data.image_folder={folder}"),
            r"identity folders without images \['Oliver'\]",
        ),
        (("data.identities=[id1, Bob]",), r"data.identities: \['Bob'\] have no images"),
        ((f"base.path={tmp_path / 'nowhere'}",), r"base.path: .*nowhere' is not a local folder"),
        ((f"data.dataset={tmp_path / 'no-data'}",), r"data.dataset: .*no-data: no committed shards"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            finetune(finetune_config(out, faces, base, *overrides))
        assert not out.exists()
    with pytest.raises(ConfigError, match=r"lora.rank: Input should be greater than 0"):
        finetune_config(out, faces, base, "lora.rank=0")
    with pytest.raises(ConfigError, match=r"data.caption: .*unknown placeholder\(s\) \{hair\}"):
        finetune_config(out, faces, base, "data.caption='a photo of {name}, {hair}'")

    inline = read_prompt_set("cross-domain")
    inline["templates"][1]["text"] = "a selfie of {name} at {place}"
    with pytest.raises(
        ConfigError, match=r"generator.sd_lora.prompts: .*id 'named'\) for Gerardo: unknown placeholder"
    ):
        generate_config(out, base, None, f"generator.prompts={json.dumps(inline)}")
    bad_file = tmp_path / "bad-prompts.yaml"
    bad_file.write_text(yaml.safe_dump(inline))
    with pytest.raises(
        ConfigError, match=r"prompt set .*bad-prompts.yaml: .*unknown placeholder\(s\) \{place\}"
    ):
        generate_config(out, base, None, f"generator.prompts={bad_file}")
    for overrides, message in [
        ((f"generator.base.path={tmp_path / 'nowhere'}",), r"generator.base.path: .*not a local folder"),
        ((f"generator.lora={tmp_path}",), r"generator.lora: .* has no pytorch_lora_weights.safetensors"),
        (
            ("identities.samples_per_identity=4",),
            r"samples_per_identity: expected 5 = 5 templates x 1 images",
        ),
        (("identities.count=4",), r"identities.count: 4, but the prompt set has 3 people"),
    ]:
        with pytest.raises(ConfigError, match=message):
            plan(generate_config(out, base, None, *overrides))
        assert not out.exists()


# --- slow: the finetune_lora job on Ray Train, exact resume after SIGKILL, the cross-domain job --------


@pytest.fixture(scope="module")
def finetuned(ray_local, faces, base, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("finetune") / "run")
    result = finetune(finetune_config(out, faces, base))
    return {"out": out, "result": result}


@pytest.mark.slow  # Ray Train start: ~40 s on 2 busy cores
def test_finetune_job_trains_on_ray_and_writes_lora_report_and_log(finetuned, base, tmp_path):
    from diffusers import StableDiffusionPipeline

    out, result = finetuned["out"], finetuned["result"]
    assert result.steps == 6 and [r["step"] for r in result.loss_log] == [1, 2, 3, 4, 5, 6]
    assert result.model_uri == f"{out}/lora" and os.path.exists(f"{out}/lora/{WEIGHTS_FILE}")
    meta = json.load(open(f"{out}/lora/lora.json"))
    assert meta["lora"]["rank"] == 4 and meta["prediction_type"] == "epsilon" and meta["steps"] == 6
    for name in ("report.md", "loss.png", "config.yaml", "train_log.json", "train_images.parquet"):
        assert os.path.exists(f"{out}/{name}"), name
    assert "| id2 | 4 |" in open(f"{out}/report.md").read()
    plain = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    plain.load_lora_weights(result.model_uri)  # the job's LoRA is a plain diffusers LoRA
    assert plain.get_list_adapters() == {"unet": ["default_0"]}


def _lora_tensors(out: str) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{out}/lora/{WEIGHTS_FILE}")


def _checkpointed_steps(run_dir: str) -> list[int]:
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            return [r["metrics"]["step"] for r in json.load(f)["checkpoint_results"]]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@pytest.mark.slow
def test_killed_finetune_reruns_to_the_uninterrupted_weights(finetuned, faces, base, tmp_path):
    out = str(tmp_path / "killed")
    config = tmp_path / "killed.yaml"
    config.write_text(to_yaml(finetune_config(out, faces, base)))  # the fixture's run, another output
    env = {**os.environ, "FACESYNTH_PROGRESS": "0", "RAY_ADDRESS": "", "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.finetune_lora", "--config", str(config)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = os.path.join(out, "checkpoints", "tiny")
    try:
        deadline = time.time() + 300
        while not _checkpointed_steps(run_dir):
            assert proc.poll() is None and time.time() < deadline, "job ended or stalled before a checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _checkpointed_steps(run_dir) == [3] and not os.path.exists(f"{out}/lora")  # killed mid-run

    resumed = finetune(finetune_config(out, faces, base))
    assert (resumed.start_step, resumed.steps) == (3, 6)
    whole, again = _lora_tensors(finetuned["out"]), _lora_tensors(out)
    assert sorted(whole) == sorted(again) and all(torch.equal(whole[k], again[k]) for k in whole)
    assert [r["step"] for r in resumed.loss_log] == [1, 2, 3, 4, 5, 6]
    assert resumed.loss_log == finetuned["result"].loss_log
    with pytest.raises(ValueError, match=r"settings.json: the run was started with other settings \(lora: "):
        finetune(finetune_config(out, faces, base, "lora.rank=8"))


@pytest.mark.slow
def test_cross_domain_job_runs_on_the_generated_set_and_reports_per_prompt(finetuned, base, tmp_path):
    from recog.cross_domain import CrossDomainJob
    from recog.cross_domain import run as cross_domain

    real = write_faces(str(tmp_path / "real"), identities=3, samples=10)  # procedural "real" people 0, 1, 2
    synthetic = str(tmp_path / "syn")
    generate(
        generate_config(
            synthetic,
            base,
            f"{finetuned['out']}/lora",
            "generator.images_per_template=2",
            "identities.samples_per_identity=10",
        )
    )
    job = load_config(
        CrossDomainJob,
        None,
        [
            f"real={real}",
            f"synthetic={synthetic}",
            f"output={tmp_path / 'cd'}",
            "test_fraction=0.5",
            "model.input_size=32",
            "data.augment=[{name: flip}]",
            "data.shuffle_buffer=16",
            "data.decode_batch=16",
            "train.steps=6",
            "train.batch_size=8",
            "train.checkpoint_every=6",
            "train.log_every=3",
        ],
    )
    result = cross_domain(job)
    info = result.info
    assert info["identities"] == [0, 1, 2] and len(info["experiments"]) == 6
    assert info["splits"]["synthetic"]["test"] == {"0": 5, "1": 5, "2": 5}  # 1 of 2 per person and prompt
    report = open(info["report"]).read()
    assert report.count(": per prompt (") == 6
    for text in [t for texts in PAPER.values() for t in texts]:
        assert f"| {text} | 1 |" in report, text
    synthetic_test = [e for e in info["experiments"] if e["test"] == "Diffusion"][0]
    assert {row["group"] for row in synthetic_test["per_prompt"]} >= set(PAPER["Timothy"])
