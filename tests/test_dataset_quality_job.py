"""Dataset-quality job: Ray Data embedding of shard datasets, quality.json numbers, leakage, errors."""

from __future__ import annotations

import functools
import io
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from facesynth import manifest, shards, storage
from facesynth.config import ConfigError, load_config
from facesynth.embed import choose_subset, embed_dataset, plan_embedding, run_embedding
from facesynth.face_model import load_face_model
from jobs.dataset_quality import main
from recog import quality
from recog.backbones import build_backbone
from recog.dataset_quality import DatasetQualityJob, run
from recog.export import export_embedder
from synthgen.procedural.generator import ProceduralConfig, ProceduralGenerator
from synthgen.stage import StageConfig, run_plain

torch.set_num_threads(1)  # 2 shared cores: more threads only spin
SIZE, IDS, SAMPLES = 32, 12, 4
SHARED = [8, 9, 10, 11]  # the reference holds identities 8..19: same ids, same seeds, same images
T0 = (200, 300)


class TwoStageProcedural(ProceduralGenerator):
    """Procedural faces labelled as two-stage samples: t0 = 200 for even samples, 300 for odd ones."""

    def generate(self, identities, samples, seeds):
        out = super().generate(identities, samples, seeds)
        out.t0 = np.where(np.asarray(samples) % 2 == 0, *T0)
        return out


def export_judge(uri: str, input_size: int) -> str:
    torch.manual_seed(0)
    model = build_backbone("iresnet18", embedding_dim=32, width=0.125, input_size=input_size)
    export_embedder(model, uri, input_size=input_size, embedding_dim=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    return uri


def render(
    uri: str, identities: int, *, offset: int = 0, per_unit: int = 2, generator=ProceduralGenerator
) -> str:
    """A committed shard dataset of procedural faces (base seed 0: identity i looks the same everywhere)."""
    factory = functools.partial(generator, ProceduralConfig(size=SIZE))
    run_plain(
        shards.plan_units(identities, SAMPLES, per_unit, identity_offset=offset),
        factory,
        uri,
        base_seed=0,
        cfg=StageConfig(),
        settings={},
    )
    return uri


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    return {
        "root": root,
        "syn": render(str(root / "syn"), IDS, generator=TwoStageProcedural),
        "ref": render(str(root / "ref"), IDS, offset=SHARED[0], per_unit=3),
        "judge": export_judge(str(root / "judge"), SIZE),
        "judge48": export_judge(str(root / "judge48"), 48),
    }


@functools.cache
def direct(uri: str, judge: str, resize_to: int | None = None) -> dict:
    """Embeddings of every row computed here, independently of the job's code."""
    rows = list(shards.iter_rows(uri))
    images = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    judged = images
    if resize_to:
        size = (resize_to, resize_to)
        judged = np.stack(
            [np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BILINEAR)) for im in images]
        )
    return {
        "emb": load_face_model(judge).embed(judged, batch_size=16),
        "ids": np.array([r["identity"] for r in rows]),
        "samples": np.array([r["sample"] for r in rows]),
        "t0": np.array([r["t0"] for r in rows]),
        "images": images,
    }


def test_choose_subset_is_even_over_ids_and_takes_smallest_samples():
    ids = np.array([5, 5, 5, 1, 1, 9, 9, 9, 9, 3])
    samples = np.array([2, 0, 1, 7, 3, 4, 1, 0, 2, 0])
    subset = choose_subset(ids, samples, max_identities=2, max_images_per_identity=2)
    np.testing.assert_array_equal(subset.identities, [1, 9])  # sorted ids [1, 3, 5, 9] -> positions 0 and 3
    np.testing.assert_array_equal(subset.mask(ids, samples), [0, 0, 0, 1, 1, 0, 1, 1, 0, 0])
    assert subset.mask(ids, samples).sum() == 4
    assert choose_subset(ids, samples).mask(ids, samples).all()
    with pytest.raises(ValueError, match="max_identities=0"):
        choose_subset(ids, samples, max_identities=0)


def test_job_numbers_equal_quality_functions_on_direct_embeddings(data, ray_local, capsys):
    out = str(data["root"] / "report")
    code = main(
        [
            "--config",
            "dataset-quality-quickstart",
            f"dataset={data['syn']}",
            f"reference={data['ref']}",
            f"judge={data['judge']}",
            f"output={out}",
            "max_identities=null",
            "max_images_per_identity=null",
            "resize=false",
            "batch_size=5",
            "num_workers=1",
            "num_cpus_per_worker=0.5",
            "leakage_threshold=0.995",
            "lpips=true",
            "grid_identities=3",
            "grid_samples=6",
        ]
    )
    assert code == 0
    q = json.loads(storage.read_bytes(storage.join(out, "quality.json")))
    syn, ref = direct(data["syn"], data["judge"]), direct(data["ref"], data["judge"])
    e, ids = syn["emb"], syn["ids"]

    consistency = quality.identity_consistency(e, ids)
    per_id = np.array(list(consistency["per_identity"].values()))
    assert q["images"] == IDS * SAMPLES and q["identities"] == IDS
    np.testing.assert_allclose(q["identity_consistency"]["mean"], consistency["mean"], rtol=1e-5)
    summary = q["identity_consistency"]["per_identity"]
    np.testing.assert_allclose(
        [summary["min"], summary["median"], summary["max"]],
        [per_id.min(), np.median(per_id), per_id.max()],
        rtol=1e-5,
    )
    lowest = sorted(consistency["per_identity"], key=consistency["per_identity"].get)[:10]
    assert [row["identity"] for row in q["identity_consistency"]["lowest"]] == lowest
    np.testing.assert_allclose(
        q["intra_class_diversity"]["mean"], quality.intra_class_diversity(e, ids)["mean"], rtol=1e-5
    )
    sep = quality.inter_class_separation(e, ids)
    for key, value in sep.items():
        np.testing.assert_allclose(q["inter_class_separation"][key], value, rtol=1e-5, err_msg=key)
    pr = quality.precision_recall(ref["emb"], e, k=3)
    assert q["precision_recall"] == pr  # fractions of 48 points: identical, not just close
    np.testing.assert_allclose(q["fid"], quality.fid(ref["emb"], e), rtol=1e-3, atol=1e-5)

    # per-row seeds give the shared identities identical images in both sets, hence identical
    # centres: exactly the shared identities leak, onto themselves
    np.testing.assert_array_equal(
        syn["images"][np.isin(ids, SHARED)], ref["images"][np.isin(ref["ids"], SHARED)]
    )
    leaks = quality.identity_leakage(e, ids, ref["emb"], ref["ids"], 0.995)
    flagged = q["leakage"]["flagged"]
    assert [r["synthetic_identity"] for r in flagged] == SHARED
    assert [r["nearest_real_identity"] for r in flagged] == SHARED
    np.testing.assert_allclose([r["cosine"] for r in flagged], 1.0, atol=1e-5)
    assert max(r["cosine"] for r in leaks if r["synthetic_identity"] not in SHARED) < 0.995
    assert q["leakage"]["identities_checked"] == IDS and q["leakage"]["threshold_source"] == "config"

    assert q["t0_histogram"] == {"t0": list(T0), "count": [IDS * SAMPLES // 2] * 2, "single_stage_rows": 0}
    reason = quality.lpips_unavailable_reason("alex")
    assert q["lpips"] == {"status": "skipped", "reason": reason} if reason else q["lpips"]["status"] == "ok"

    report = storage.read_bytes(storage.join(out, "report.md")).decode()
    for identity in SHARED:
        assert f"| {identity} | {identity} | 1.0000 |" in report
    assert "4 of 12 identities" in report and "| 200 | 24 |" in report
    grid = np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "samples.png")))))
    assert grid.shape == (3 * SIZE, 4 * SIZE, 3)
    for row, identity in enumerate([0, 5, 11]):  # 3 identities evenly spaced over 0..11
        for col in range(SAMPLES):
            expected = syn["images"][(ids == identity) & (syn["samples"] == col)][0]
            np.testing.assert_array_equal(
                grid[row * SIZE : (row + 1) * SIZE, col * SIZE : (col + 1) * SIZE], expected
            )
    resolved = yaml.safe_load(storage.read_bytes(storage.join(out, "config.yaml")))
    assert resolved["leakage_threshold"] == 0.995 and resolved["dataset"] == data["syn"]
    printed = capsys.readouterr().out
    assert (
        "leakage: 4 of 12 identities above cosine 0.9950 (config)" in printed
        and "t0: 200x24, 300x24" in printed
    )


def test_ray_embeddings_equal_in_process_ones_in_dataset_order(data, ray_local):
    """Two datasets through one actor pool, batches (5 rows) straddling shards (8 and 12 rows)."""
    plans = [
        plan_embedding(data["syn"], data["judge"], max_identities=5, max_images_per_identity=3),
        plan_embedding(data["ref"], data["judge"]),
    ]
    got = run_embedding(plans, batch_size=5, num_workers=2, num_cpus_per_worker=0.5)
    syn, ref = direct(data["syn"], data["judge"]), direct(data["ref"], data["judge"])
    keep = np.isin(syn["ids"], [0, 2, 5, 8, 11]) & (syn["samples"] < 3)
    for emb, want, rows in [(got[0], syn, keep), (got[1], ref, slice(None))]:
        np.testing.assert_array_equal(emb.identities, want["ids"][rows])
        np.testing.assert_array_equal(emb.columns["sample"], want["samples"][rows])
        np.testing.assert_array_equal(emb.columns["t0"], want["t0"][rows])
        assert emb.embeddings.dtype == np.float32
        np.testing.assert_allclose(emb.embeddings, want["emb"][rows], atol=1e-5)
    assert got[0].embeddings.shape == (15, 32) and len(got[1].identities) == IDS * SAMPLES
    assert set(got[0].columns) == {"sample", "t0", "prompt"}


def test_size_mismatch_is_an_error_unless_resize(data):
    with pytest.raises(ValueError, match="32x32 pixels but the judge expects 48x48.*resize=true"):
        plan_embedding(data["syn"], data["judge48"])
    got = embed_dataset(data["syn"], data["judge48"], resize=True, max_identities=3, use_ray=False)
    ref = direct(data["syn"], data["judge48"], resize_to=48)
    keep = np.isin(ref["ids"], [0, 5, 11])
    np.testing.assert_array_equal(got.identities, ref["ids"][keep])
    np.testing.assert_allclose(got.embeddings, ref["emb"][keep], atol=1e-5)


def empty_dataset(uri: str) -> str:
    """A dataset whose one committed shard has no rows."""
    table = shards.to_table({name: [] for name in shards.SCHEMA.names})
    manifest.commit(uri, [shards.write_shard(uri, 0, table)], manifest.Plan(1, {}))
    return uri


def weightless_judge(data: dict, root) -> str:
    """A judge folder with model.json but without the model.pt it names."""
    (root / "weightless").mkdir()
    (root / "weightless" / "model.json").write_bytes(
        storage.read_bytes(storage.join(data["judge"], "model.json"))
    )
    return str(root / "weightless")


BAD_INPUTS = {
    "no_judge": (
        lambda d, t: {"judge": str(t / "missing")},
        FileNotFoundError,
        r"judge=.*model\.json not found",
    ),
    "no_weights": (
        lambda d, t: {"judge": weightless_judge(d, t)},
        FileNotFoundError,
        r"judge=.*model\.pt not found",
    ),
    "no_shards": (lambda d, t: {"dataset": str(t)}, FileNotFoundError, "no committed shards"),
    "no_rows": (lambda d, t: {"dataset": empty_dataset(str(t / "empty"))}, ValueError, "hold no rows"),
    "size": (lambda d, t: {"judge": d["judge48"]}, ValueError, "32x32 pixels but the judge expects 48x48"),
    "one_identity": (lambda d, t: {"dataset": render(str(t / "solo"), 1)}, ValueError, "1 identity to judge"),
    "k": (
        lambda d, t: {"reference": d["ref"], "k": 48},
        ValueError,
        r"k=48: precision/recall needs k < the images of both sets \(dataset 48, reference 48\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_fail_before_work_and_leave_no_output(data, tmp_path, case):
    make, error, match = BAD_INPUTS[case]
    fields = {
        "dataset": data["syn"],
        "judge": data["judge"],
        "output": str(tmp_path / "out"),
        "use_ray": False,
    }
    with pytest.raises(error, match=match):
        run(DatasetQualityJob(**fields | make(data, tmp_path)))
    assert not storage.exists(storage.join(fields["output"], "quality.json"))
    assert not storage.exists(fields["output"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("leakage_threshold=1.5", "leakage_threshold"),
        ("max_identities=1", "max_identities"),
        ("batch_size=0", "batch_size"),
        ("lpips_net=resnet", "lpips_net"),
        ("judges=x", "judges"),
    ],
)
def test_config_rejects_impossible_values_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"\b{key}: "):
        load_config(DatasetQualityJob, "dataset-quality-quickstart", [override])
