"""The evaluate job (recog.evaluate.run): metrics equal the library computed directly, report files, input errors before work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from facesynth import binsets, storage
from facesynth.binsets import read_template_set
from facesynth.face_model import load_face_model
from facesynth.images import encode as encode_images
from jobs.evaluate import main
from recog.backbones import build_backbone
from recog.evaluate import EvaluateJob, run
from recog.export import export_embedder
from recog.roc import pool_templates, tar_at_fmr, template_pair_scores
from recog.verification import verify_embeddings
from synthgen.benchmark_sets import build_benchmark

torch.set_num_threads(2)
SIZE = 32
PAIRS = {"lfw-like": 200, "cfp-fp-like": 60, "agedb-like": 0, "ijbc-like": 100}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("bench"))
    build_benchmark(out, style="render", size=SIZE, num_identities=40, pair_counts=PAIRS)
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("model"))
    torch.manual_seed(0)
    backbone = build_backbone("iresnet18", embedding_dim=16, width=0.0625, input_size=SIZE)
    export_embedder(backbone, out, input_size=SIZE, embedding_dim=16, mean=[0.5] * 3, std=[0.5] * 3)
    return out


def _cfg(model: str, bench: str, output: str, **changes) -> EvaluateJob:
    base = {
        "model": model,
        "sets": [{"uri": f"{bench}/lfw-like.bin"}, {"uri": f"{bench}/cfp-fp-like.bin", "name": "cfp"}],
        "tar_pairs": [{"uri": f"{bench}/ijbc-like"}],
        "output": output,
        "batch_size": 64,
    }
    return EvaluateJob.model_validate(base | changes)


def _direct_pairs(model: str, uri: str, **overrides):
    """The library path by hand: restricted read, decode, embed, insightface verification, TAR on cosines."""
    encoded, issame = binsets.read_bin(uri)
    emb = load_face_model(model, overrides=overrides or None).embed_set(binsets.decode_images(encoded, SIZE))
    e1, e2 = emb.embeddings[0::2], emb.embeddings[1::2]
    result = verify_embeddings(e1, e2, issame, xnorm=emb.xnorm)
    n_impostors = int(np.sum(~issame))
    targets = [t for t in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1) if t * n_impostors >= 1]
    return result, tar_at_fmr(np.sum(e1.astype(np.float64) * e2, 1), issame, targets)


def test_metrics_and_report_match_direct_computation(model, bench, tmp_path):
    out = str(tmp_path / "eval")
    metrics = run(_cfg(model, bench, out)).metrics
    written = json.loads(storage.read_bytes(f"{out}/metrics.json"))
    assert written == json.loads(json.dumps(metrics))
    assert list(written["sets"]) == ["lfw-like", "cfp"]

    table_rows = []
    # TAR only where target x impostor pairs >= 1: lfw-like has 100 impostor pairs, cfp 30
    expected_fmrs = {"lfw-like": ["0.01", "0.1"], "cfp": ["0.1"]}
    for name, file, n_pairs in (("lfw-like", "lfw-like.bin", 200), ("cfp", "cfp-fp-like.bin", 60)):
        result, tar = _direct_pairs(model, f"{bench}/{file}")
        got = written["sets"][name]
        assert got["pairs"] == n_pairs == result.n_pairs
        assert (got["accuracy"], got["std"]) == (result.accuracy, result.std)
        assert (got["val_at_far_1e-3"], got["val_std"], got["far"]) == (
            result.val,
            result.val_std,
            result.far,
        )
        assert got["best_thresholds"] == result.best_thresholds.tolist()
        assert got["xnorm"] == pytest.approx(result.xnorm, rel=1e-12)
        assert list(got["tar_at_fmr"]) == expected_fmrs[name]
        assert got["tar_at_fmr"] == {f"{k:g}": v for k, v in tar.items()}
        tars = " | ".join(f"{100 * tar[float(k)]:.2f}" if float(k) in tar else "–" for k in ("0.01", "0.1"))
        table_rows.append(
            f"| {name} | {n_pairs} | {100 * result.accuracy:.2f} ± {100 * result.std:.2f} | "
            f"{100 * result.val:.2f} ± {100 * result.val_std:.2f} | {tars} |"
        )
    assert written["mean_accuracy"] == pytest.approx(
        np.mean([written["sets"][n]["accuracy"] for n in ("lfw-like", "cfp")]), abs=1e-15
    )

    # template set: IJB-C pooling of the same embeddings, then TAR on template cosines
    ts = read_template_set(f"{bench}/ijbc-like")
    emb = load_face_model(model).embed(binsets.decode_images(ts.images, SIZE))
    ids, feats = pool_templates(emb, ts.media_ids, ts.template_ids)
    scores = template_pair_scores(ids, feats, ts.template_1, ts.template_2)
    expected = tar_at_fmr(scores, ts.issame, [0.1])  # 90 impostor pairs: only 1e-1 is measurable
    got = written["tar_pairs"]["ijbc-like"]
    assert (got["pairs"], got["templates"], got["images"]) == (100, 20, len(ts.images))
    assert got["tar_at_fmr"] == {"0.1": expected[0.1]}

    report = storage.read_bytes(f"{out}/report.md").decode()
    for row in table_rows:
        assert row in report
    assert "| ijbc-like | 100 | 20 |" in report and "![ROC](roc.png)" in report
    for png in ("accuracy.png", "roc.png"):
        with Image.open(f"{out}/{png}") as image:
            assert image.format == "PNG" and min(image.size) > 100
    config = yaml.safe_load(storage.read_bytes(f"{out}/config.yaml"))
    assert config == written["config"] and config["sets"][1] == {
        "uri": f"{bench}/cfp-fp-like.bin",
        "name": "cfp",
    }


def test_overrides_and_cli(model, bench, tmp_path, capsys):
    """AdaFace-style overrides reach the embedder; the CLI prints the one-screen summary."""
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"model": model, "sets": [{"uri": f"{bench}/lfw-like.bin"}]}))
    out = str(tmp_path / "cli")
    code = main(["--config", str(config), f"output={out}", "channel_order=BGR", "flip_fusion=norm_weighted"])
    assert code == 0
    metrics = json.loads(storage.read_bytes(f"{out}/metrics.json"))
    result, _ = _direct_pairs(
        model, f"{bench}/lfw-like.bin", channel_order="BGR", flip_fusion="norm_weighted"
    )
    assert metrics["sets"]["lfw-like"]["accuracy"] == result.accuracy
    assert metrics["model_spec"]["channel_order"] == "BGR"
    assert metrics["model_spec"]["flip_fusion"] == "norm_weighted"
    printed = capsys.readouterr().out
    assert f"lfw-like{200:>21}" in printed and f"{100 * result.accuracy:.2f}" in printed
    assert f"report: {out}/report.md" in printed


def test_ray_actors_give_the_in_process_numbers(model, bench, tmp_path, ray_local):
    local = run(_cfg(model, bench, str(tmp_path / "local"))).metrics
    spread = run(_cfg(model, bench, str(tmp_path / "ray"), num_workers=2)).metrics
    for name in ("lfw-like", "cfp"):
        a, b = local["sets"][name], spread["sets"][name]
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-12)
        assert b["val_at_far_1e-3"] == pytest.approx(a["val_at_far_1e-3"], abs=1e-12)
        assert b["xnorm"] == pytest.approx(a["xnorm"], rel=1e-6)
        assert b["tar_at_fmr"] == pytest.approx(a["tar_at_fmr"], abs=1e-12)
    assert spread["tar_pairs"]["ijbc-like"]["tar_at_fmr"] == pytest.approx(
        local["tar_pairs"]["ijbc-like"]["tar_at_fmr"], abs=1e-12
    )


def _bad_bins(tmp_path, bench) -> dict[str, tuple[str, str]]:
    """name -> (uri, expected message) of inputs that must be refused."""
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # a pickle that would run a shell command
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(open(f"{bench}/lfw-like.bin", "rb").read()[:5000])
    wrong_size = str(tmp_path / "big.bin")
    faces = np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    binsets.write_bin(wrong_size, encode_images(faces), [True, False])
    return {
        "evil": (str(evil), "refused to unpickle global os.system"),
        "truncated": (str(truncated), "truncated or corrupt"),
        "wrong_size": (wrong_size, "image 0 is 40x40 pixels, the model expects 32x32"),
    }


def test_bad_inputs_fail_before_work_and_write_nothing(model, bench, tmp_path):
    out = tmp_path / "eval"
    for uri, message in _bad_bins(tmp_path, bench).values():
        cfg = _cfg(model, bench, str(out), sets=[{"uri": f"{bench}/lfw-like.bin"}, {"uri": uri}])
        with pytest.raises(ValueError, match=message):
            run(cfg)
        assert not out.exists()
    with pytest.raises(FileNotFoundError, match="no model.json"):
        run(_cfg(str(tmp_path / "no-model"), bench, str(out)))
    with pytest.raises(FileNotFoundError, match="templates.parquet"):
        run(_cfg(model, bench, str(out), tar_pairs=[{"uri": str(tmp_path)}]))
    assert not out.exists()


def test_resize_accepts_other_sizes(model, tmp_path):
    """With resize=true a 64 px set is resized short-side to the model's 32 px, as insightface does."""
    faces = np.random.default_rng(1).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    uri = str(tmp_path / "big.bin")
    binsets.write_bin(uri, encode_images(faces), [i % 2 == 0 for i in range(20)])
    metrics = run(
        EvaluateJob(model=model, sets=[{"uri": uri}], output=str(tmp_path / "o"), resize=True, nrof_folds=2)
    ).metrics
    emb = load_face_model(model).embed(binsets.decode_images(encode_images(faces), SIZE))
    expected = verify_embeddings(emb[0::2], emb[1::2], np.arange(20) % 2 == 0, nrof_folds=2)
    assert metrics["sets"]["big"]["accuracy"] == expected.accuracy


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sets": [], "tar_pairs": []}, "both empty"),
        ({"sets": [{"uri": "a/lfw.bin"}, {"uri": "b/lfw.bin"}]}, r"\['lfw'\] appear more than once"),
        ({"fmr_targets": [0.0]}, "fmr_targets"),
        ({"flip_fusion": "max"}, "flip_fusion"),
        ({"num_workers": 0}, "num_workers"),
    ],
)
def test_config_errors_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        EvaluateJob.model_validate({"model": "m", "output": "o", "sets": [{"uri": "x.bin"}]} | changes)
