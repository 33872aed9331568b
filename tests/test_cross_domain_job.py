"""The cross-domain study job: split rule, split datasets, input errors, and a tiny end-to-end run."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from facesynth import shards
from facesynth.config import load_config
from jobs.cross_domain import main
from recog import cross_domain as cd
from recog.classification import classification_metrics
from recog.cross_domain import CrossDomainJob, check_sources, run
from synthgen.procedural.generator import ProceduralConfig, ProceduralGenerator
from synthgen.stage import StageConfig, run_plain

torch.set_num_threads(2)

PROMPTS = ("a selfie of a person", "a picture of a person", "a selfie of a young person, curly hair")


class PromptedProcedural(ProceduralGenerator):
    """Procedural faces with a prompt per sample (``sample % 3``), standing in for SD+LoRA prompt sets."""

    def generate(self, identities, samples, seeds):
        out = super().generate(identities, samples, seeds)
        out.prompts = [PROMPTS[int(s) % len(PROMPTS)] for s in samples]
        return out


def make_dataset(
    uri: str, style: str, identities: int, samples: int, offset: int = 0, prompted: bool = False
):
    """``identities`` x ``samples`` procedural 32 px faces (identity ids from ``offset``) at ``uri``."""
    cls = PromptedProcedural if prompted else ProceduralGenerator
    run_plain(
        shards.plan_units(identities, samples, 2, identity_offset=offset),
        functools.partial(cls, ProceduralConfig(style=style, size=32)),
        uri,
        base_seed=7,
        cfg=StageConfig(batch_size=64, commit_every_s=0),
        settings={"style": style, "prompted": prompted},
    )
    return uri


def job(tmp_path, real: str, synthetic: str, *overrides: str) -> CrossDomainJob:
    base = [
        f"real={real}",
        f"synthetic={synthetic}",
        f"output={tmp_path / 'out'}",
        "model.input_size=32",
    ]
    return load_config(CrossDomainJob, None, [*base, *overrides])


# --- split rule -------------------------------------------------------------------------------


def expected_mask(identity, sample, prompt, fraction, seed):
    """Independent restatement: per (identity, prompt) the round(f*n) (1..n-1) rows of smallest row seed."""
    mask = np.zeros(len(identity), bool)
    seeds = shards.row_seeds(seed, identity, sample)
    for key in {(int(i), p) for i, p in zip(identity, prompt)}:
        rows = [r for r in range(len(identity)) if (int(identity[r]), prompt[r]) == key]
        n = len(rows)
        k = 0 if n == 1 else min(max(int(np.floor(fraction * n + 0.5)), 1), n - 1)
        mask[sorted(rows, key=lambda r: seeds[r])[:k]] = True
    return mask


def test_split_is_stratified_deterministic_and_order_free():
    rng = np.random.default_rng(0)
    identity = np.repeat([3, 5, 9], 20)
    sample = np.tile(np.arange(20), 3)
    prompt = [PROMPTS[s % 3] if i != 9 else "" for i, s in zip(identity, sample)]
    mask = cd.split_mask(identity, sample, prompt, 0.25, seed=4)
    np.testing.assert_array_equal(mask, expected_mask(identity, sample, prompt, 0.25, 4))
    # per identity and prompt: groups of 7, 7, 6 samples -> 2, 2, 2 test rows; identity 9 (one group of 20) -> 5
    for ident in (3, 5):
        for p in PROMPTS:
            group = (identity == ident) & (np.array(prompt) == p)
            assert mask[group].sum() == 2
    assert mask[identity == 9].sum() == 5
    np.testing.assert_array_equal(cd.split_mask(identity, sample, prompt, 0.25, seed=4), mask)
    perm = rng.permutation(len(identity))
    shuffled = cd.split_mask(identity[perm], sample[perm], [prompt[k] for k in perm], 0.25, seed=4)
    np.testing.assert_array_equal(shuffled, mask[perm])
    assert not np.array_equal(cd.split_mask(identity, sample, prompt, 0.25, seed=5), mask)


def test_split_keeps_singletons_in_train_and_every_larger_group_in_both():
    mask = cd.split_mask(np.array([0, 1, 1, 2, 2, 2]), np.array([0, 0, 1, 0, 1, 2]), [""] * 6, 0.01, 0)
    assert mask.tolist()[0] is False
    assert mask[1:3].sum() == 1 and mask[3:].sum() == 1  # at least 1 test row, at most n - 1
    assert cd.split_mask(np.array([0, 0]), np.array([0, 1]), ["", ""], 0.99, 0).sum() == 1
    with pytest.raises(ValueError, match="test_fraction=1.0"):
        cd.split_mask(np.array([0]), np.array([0]), [""], 1.0, 0)
    with pytest.raises(ValueError, match="equal lengths"):
        cd.split_mask(np.array([0, 1]), np.array([0]), ["", ""], 0.5, 0)


def test_split_datasets_are_disjoint_complete_and_resumable(tmp_path):
    source = make_dataset(str(tmp_path / "syn"), "photo", identities=3, samples=9, prompted=True)
    plan = cd.plan_split(source, [0, 2], 0.34, seed=1)  # identity 1 dropped
    base = str(tmp_path / "split")
    assert cd.write_split(plan, base, {"seed": 1}) == 2  # units {0, 1} and {2}
    keys = {
        part: [(r["identity"], r["sample"]) for r in shards.iter_rows(uri, ["identity", "sample"])]
        for part, uri in cd.split_uris(base).items()
    }
    source_keys = [(r["identity"], r["sample"]) for r in shards.iter_rows(source, ["identity", "sample"])]
    assert not set(keys["train"]) & set(keys["test"])
    assert sorted(keys["train"] + keys["test"]) == [k for k in source_keys if k[0] != 1]
    # 3 prompts x 3 samples per identity: round(0.34 * 3) = 1 test row per prompt
    assert plan.counts() == {"train": {0: 6, 2: 6}, "test": {0: 3, 2: 3}}
    rows = list(shards.iter_rows(cd.split_uris(base)["test"], ["identity", "sample", "prompt"]))
    assert sorted((r["identity"], r["prompt"]) for r in rows) == sorted(
        (i, p) for i in (0, 2) for p in PROMPTS
    )
    assert (
        shards.verify(cd.split_uris(base)["train"]) == [] and shards.verify(cd.split_uris(base)["test"]) == []
    )
    assert cd.write_split(plan, base, {"seed": 1}) == 0  # complete: nothing rewritten


# --- report helpers ---------------------------------------------------------------------------


def test_study_table_has_the_papers_layout_and_key_findings():
    label = {"real": "Real", "synthetic": "Diffusion", "combined": "Combined"}
    acc = [0.4, 0.357, 0.687, 0.48, 0.573, 0.4]
    lines = cd.study_table(cd.RUNS, acc, label).splitlines()
    assert lines[:2] == ["| Training → Testing | Accuracy | Key Finding |", "|---|---|---|"]
    assert lines[2:] == [
        "| Real → Real | 40.00% | In-domain baseline |",
        "| Real → Diffusion | 35.70% | Transfer drop (-33.0% vs Diffusion → Diffusion) |",
        "| Diffusion → Diffusion | 68.70% | In-domain baseline |",
        "| Diffusion → Real | 48.00% | Transfer gain (+8.0% vs Real → Real) |",
        "| Combined → Diffusion | 57.30% | Domain interference (-11.4% vs Diffusion → Diffusion) |",
        "| Combined → Real | 40.00% | No change (+0.0% vs Real → Real) |",
    ]


# --- input errors (before anything is written) -------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return {
        "a": make_dataset(str(root / "a"), "render", identities=3, samples=2),
        "b": make_dataset(str(root / "b"), "photo", identities=3, samples=2, offset=1),
        "one": make_dataset(str(root / "one"), "photo", identities=1, samples=4),
        "single": make_dataset(str(root / "single"), "photo", identities=3, samples=1),
    }


def test_bad_inputs_fail_before_any_output(small, tmp_path):
    cases = [
        ((str(tmp_path / "missing"), small["a"]), r"real='.*missing': no shard dataset"),
        ((small["a"], small["b"]), r"only in real \[0\], only in synthetic \[3\]"),
        ((small["one"], small["one"]), r"share identities \[0\]: expected at least 2"),
        ((small["a"], small["single"]), r"synthetic: identities \[0, 1, 2\] have no test samples"),
        ((small["a"], small["a"], "model.input_size=64"), r"real: .*expected model.input_size=64"),
    ]
    for (real, syn, *extra), message in cases:
        with pytest.raises(ValueError, match=message):
            run(job(tmp_path, real, syn, *extra))
        assert not os.path.exists(tmp_path / "out")


def test_intersection_keeps_the_common_identities(small, tmp_path):
    assert check_sources(job(tmp_path, small["a"], small["b"], "identities=intersection")) == [1, 2]


def test_changed_split_settings_are_refused(small, tmp_path):
    record = tmp_path / "out" / "splits" / "split.json"
    record.parent.mkdir(parents=True)
    record.write_text(
        json.dumps(
            {
                "real": small["a"],
                "synthetic": small["a"],
                "identities": [0, 1, 2],
                "test_fraction": 0.2,
                "seed": 0,
            }
        )
    )
    with pytest.raises(ValueError, match=r"other settings \(test_fraction=0.2\)"):
        run(job(tmp_path, small["a"], small["a"], "test_fraction=0.5"))


# --- end to end -------------------------------------------------------------------------------


NUM_IDENTITIES = 4


@pytest.fixture(scope="module")
def study(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    real = make_dataset(str(root / "real"), "render", NUM_IDENTITIES, 24)
    synthetic = make_dataset(str(root / "synthetic"), "photo", NUM_IDENTITIES, 24, prompted=True)
    out = str(root / "out")
    argv = [
        f"real={real}",
        f"synthetic={synthetic}",
        f"output={out}",
        "test_fraction=0.25",
        "model.input_size=32",
        "data.augment=[{name: flip}]",
        "data.shuffle_buffer=64",
        "data.decode_batch=32",
        "optim.lr=0.001",
        "optim.schedule=constant",
        "train.steps=40",
        "train.batch_size=16",
        "train.checkpoint_every=40",
        "train.log_every=10",
    ]
    assert main(argv) == 0
    return {"result": written_result(out), "out": out, "argv": argv}


def written_result(out: str) -> dict:
    """What the job wrote to ``cross_domain.json`` (``main`` returns the exit code)."""
    with open(os.path.join(out, "cross_domain.json")) as f:
        return json.load(f)


def test_job_runs_the_six_experiments_and_reports_them(study, capsys):
    result, out = study["result"], study["out"]
    assert [e["run"] for e in result["experiments"]] == [r.slug for r in cd.RUNS]
    assert result["splits"]["real"]["test"] == {str(i): 6 for i in range(NUM_IDENTITIES)}
    assert result["splits"]["synthetic"]["test"] == {str(i): 6 for i in range(NUM_IDENTITIES)}  # 2 per prompt
    report = open(os.path.join(out, "cross_domain.md")).read()
    for train, test in [
        ("Real", "Real"),
        ("Real", "Diffusion"),
        ("Diffusion", "Diffusion"),
        ("Diffusion", "Real"),
        ("Combined", "Diffusion"),
        ("Combined", "Real"),
    ]:
        assert f"| {train} → {test} | " in report
    assert "| Training → Testing | Accuracy | Key Finding |" in report
    assert report.count(": per prompt (") == 6 and report.count(": per class (") == 6
    assert f"| {PROMPTS[2]} | 8 |" in report and "| (none) | 24 |" in report
    for name in ("confusion.png", "config.yaml", "cross_domain.json", "splits/split.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert all(t["steps"] == 40 and t["num_classes"] == NUM_IDENTITIES for t in result["trainings"].values())


def test_reported_numbers_equal_metrics_recomputed_from_saved_predictions(study):
    for e in study["result"]["experiments"]:
        table = pq.read_table(e["predictions"])
        assert len(table) == 24 and e["n"] == 24
        probs = np.stack(table["probs"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        predicted = np.arange(NUM_IDENTITIES)[probs.argmax(axis=1)]  # class c is identity c here
        np.testing.assert_array_equal(predicted, table["predicted"].to_numpy())
        m = classification_metrics(table["identity"].to_numpy(), predicted, probs)
        assert (e["accuracy"], e["macro_f1"], e["mean_confidence"]) == (
            m.accuracy,
            m.macro_f1,
            m.mean_confidence,
        )
        assert e["confusion"] == m.confusion.tolist()
        assert sum(row["n"] for row in e["per_prompt"]) == 24


def test_in_domain_accuracy_is_above_chance(study):
    accuracy = {e["run"]: e["accuracy"] for e in study["result"]["experiments"]}
    assert accuracy["real-to-real"] > 1 / NUM_IDENTITIES + 0.25, accuracy


def test_rerun_skips_splits_and_trainings(study, capsys):
    assert main(study["argv"]) == 0
    again = written_result(study["out"])
    printed = capsys.readouterr().out
    assert (
        "real split: 0 of 2 units written" in printed and "synthetic split: 0 of 2 units written" in printed
    )
    assert printed.count("finished earlier, reusing") == 3
    assert [e["accuracy"] for e in again["experiments"]] == [
        e["accuracy"] for e in study["result"]["experiments"]
    ]
