"""``python -m jobs.demo`` (``make demo``): the quickstart pipeline end to end on an embedded local Ray.

render procedural faces -> build the offline benchmark -> train a tiny FR model -> verify it
(insightface protocol) -> train a tiny UIFace model on the render with the FR model as judge ->
generate two-stage (adaptive t0) and single-stage sets -> judge both (identity consistency vs
chance, diversity, leakage against the render) -> ``summary.md``. Every stage is the real job
with its quickstart preset; the demo only points their inputs and outputs at one folder. Rerunning
resumes: finished datasets and checkpoints are reused.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from pydantic import BaseModel, Field

from facesynth import storage
from facesynth.config import ConfigError, StrictModel, load_config, parse_job_args
from facesynth.runtime import RayConfig, init_ray

STAGES = ("render", "benchmark", "train_fr", "evaluate", "train_uiface", "generate", "quality")


class DemoConfig(StrictModel):
    output: str = "out/quickstart"
    stages: list[str] = Field(default_factory=lambda: list(STAGES), description=f"subset of {STAGES}")
    overrides: dict[str, list[str]] = Field(
        default_factory=dict,
        description="extra key=value overrides per stage, e.g. {train_fr: [train.steps=50]}",
    )


def _stage_plan(
    root: str,
) -> list[tuple[str, str, Callable[[], tuple[type[BaseModel], Callable]], list[str]]]:
    """(stage, preset, job loader, overrides pointing the job at ``root``) in pipeline order."""

    def at(*parts: str) -> str:
        return storage.join(root, *parts)

    def render():
        from jobs.render import RenderJob, render

        return RenderJob, render

    def benchmark():
        from jobs.build_benchmark import BenchmarkJob, build

        return BenchmarkJob, build

    def train_fr():
        from recog.train.config import TrainConfig
        from recog.train.trainer import train_fr

        return TrainConfig, lambda cfg: train_fr(cfg).summary()

    def evaluate():
        from jobs.evaluate import EvaluateJob, evaluate

        return EvaluateJob, evaluate

    def train_uiface():
        from jobs.train_idcond import TrainIdCondConfig, train

        return TrainIdCondConfig, lambda cfg: {"model": train(cfg).model_uri}

    def generate():
        from jobs.generate import GenerateConfig, generate

        return GenerateConfig, lambda cfg: {"dataset": generate(cfg).uri}

    def quality():
        from jobs.dataset_quality import QualityJob, dataset_quality_job

        return QualityJob, dataset_quality_job

    fr_model, uiface_model = at("train-fr", "model"), at("uiface-train", "model")
    bench = at("benchmark")
    plan = [
        ("render", "render-quickstart", render, [f"output={at('render')}"]),
        ("benchmark", "benchmark-quickstart", benchmark, [f"output={bench}"]),
        (
            "train_fr",
            "train-fr-quickstart",
            train_fr,
            [f"output={at('train-fr')}", f"data.datasets=[{{uri: {at('render')}}}]"],
        ),
        (
            "evaluate",
            "evaluate-quickstart",
            evaluate,
            [
                f"model={fr_model}",
                f"output={at('evaluate')}",
                "sets=["
                + ", ".join(f"{{uri: {bench}/{s}.bin}}" for s in ("lfw-like", "cfp-fp-like", "agedb-like"))
                + "]",
                f"tar_pairs=[{{uri: {bench}/ijbc-like}}]",
            ],
        ),
        (
            "train_uiface",
            "uiface-train-quickstart",
            train_uiface,
            [f"data={at('render')}", f"judge={fr_model}", f"output={at('uiface-train')}"],
        ),
    ]
    for mode in ("adaptive", "single"):
        plan.append(
            (
                "generate",
                "uiface-tiny",
                generate,
                [
                    f"model.uri={uiface_model}",
                    f"output={at('uiface-' + mode)}",
                    f"sampler.mode={mode}",
                    f"identities.training={uiface_model}/identities.npy",
                    # new identities from a Gaussian fitted to the training ones: the tiny 128-d judge packs
                    # its identities so closely (median nearest-neighbour cosine 0.85) that 0.3 is unreachable
                    "identities.method=gaussian",
                    "identities.max_cosine=0.7",
                ],
            )
        )
    for mode in ("adaptive", "single"):
        plan.append(
            (
                "quality",
                "quality-quickstart",
                quality,
                [
                    f"dataset={at('uiface-' + mode)}",
                    f"judge={fr_model}",
                    f"reference={at('render')}",
                    f"output={at('quality-' + mode)}",
                    "resize=true",
                ],
            )
        )
    return plan


def summary_markdown(root: str, results: dict[str, dict], earlier: tuple[str, ...] = ()) -> str:
    """The demo's one-page summary: FR verification and the generated sets' quality.

    ``earlier`` names the results that come from an earlier run into the same folder.
    """
    lines = ["# facesynth quickstart", "", f"Everything below lives under `{root}`.", ""]
    if earlier:
        names = ", ".join(f"`{key}`" for key in earlier)
        lines += [f"Not rerun this time (results of an earlier run, from `demo.json`): {names}.", ""]
    ev = results.get("evaluate")
    if ev:
        lines += [
            "## FR model on the offline benchmark (insightface protocol)",
            "",
            "| set | accuracy | std |",
            "|---|---|---|",
        ]
        for name, rec in ev.get("sets", {}).items():
            lines.append(f"| {name} | {100 * rec['accuracy']:.2f}% | {100 * rec['std']:.2f}% |")
        lines.append("")
    rows = [(mode, results.get(f"quality:{root}/quality-{mode}")) for mode in ("adaptive", "single")]
    if any(q for _, q in rows):
        lines += [
            "## UIFace sets judged by the FR model",
            "",
            "| sampling | identity consistency | chance | intra-class diversity | leaked identities |",
            "|---|---|---|---|---|",
        ]
        for mode, q in rows:
            if q:
                ic, leak = q["identity_consistency"], q.get("leakage")
                leaked = (
                    f"{len(leak['flagged'])} of {leak['identities_checked']} (cosine > {leak['threshold']:.3f})"
                    if leak
                    else "-"
                )
                lines.append(
                    f"| {'two-stage (adaptive t0)' if mode == 'adaptive' else 'single-stage'} | "
                    f"{ic['mean']:.3f} | {ic['chance']:.3f} | {q['intra_class_diversity']['mean']:.3f} | "
                    f"{leaked} |"
                )
        lines.append("")
    return "\n".join(lines)


def plan_configs(cfg: DemoConfig) -> list[tuple[str, Callable, BaseModel]]:
    """Every selected stage's validated job config, before any stage runs."""
    unknown = sorted(set(cfg.stages) - set(STAGES)) + sorted(set(cfg.overrides) - set(STAGES))
    if unknown:
        raise ConfigError(f"stages/overrides {unknown} unknown: expected names from {STAGES}")
    plan = [p for p in _stage_plan(cfg.output) if p[0] in cfg.stages]
    return [
        (name, run, load_config(model, preset, [*over, *cfg.overrides.get(name, [])]))
        for name, preset, loader, over in plan
        for model, run in [loader()]
    ]


def shared_ray(configs: list[tuple[str, Callable, BaseModel]]) -> RayConfig:
    """One embedded Ray for every stage, offering the most CPUs any stage asks for (a stage's own
    ``ray`` settings would otherwise be ignored once the first stage has started Ray)."""
    wanted = [c.ray.num_cpus for _, _, c in configs if isinstance(getattr(c, "ray", None), RayConfig)]
    return RayConfig(num_cpus=None if not wanted or None in wanted else max(wanted))


def with_earlier_results(root: str, results: dict[str, dict]) -> tuple[dict[str, dict], tuple[str, ...]]:
    """``results`` on top of those an earlier demo run left in ``root/demo.json``, and the keys kept from it.

    A run of a few stages then still reports the whole chain in ``summary.md``.
    """
    path = storage.join(root, "demo.json")
    earlier = json.loads(storage.read_bytes(path)) if storage.exists(path) else {}
    kept = tuple(key for key in earlier if key not in results)
    return {**earlier, **results}, kept


def demo(cfg: DemoConfig) -> dict[str, dict]:
    """Run the selected stages in order; returns each stage's result keyed by stage:output (with those of
    stages an earlier run into the same folder ran and this one did not)."""
    configs = plan_configs(cfg)
    init_ray(shared_ray(configs))
    results: dict[str, dict] = {}
    for name, run, job_cfg in configs:
        start = time.perf_counter()
        print(f"\n=== {name}: {getattr(job_cfg, 'output', '')} ===", flush=True)
        out = run(job_cfg)
        key = name if name not in ("generate", "quality") else f"{name}:{job_cfg.output}"
        results[key] = out if isinstance(out, dict) else {"result": str(out)}
        print(f"=== {name} done in {time.perf_counter() - start:.0f} s ===", flush=True)
    results, earlier = with_earlier_results(cfg.output, results)
    text = summary_markdown(cfg.output, results, earlier)
    storage.write_bytes(storage.join(cfg.output, "summary.md"), text.encode())
    storage.write_bytes(
        storage.join(cfg.output, "demo.json"), json.dumps(results, indent=1, default=str).encode()
    )
    print("\n" + text)
    return results


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(DemoConfig, argv, __doc__)
    try:
        demo(cfg)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
