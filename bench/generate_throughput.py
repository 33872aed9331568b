"""UIFace generation throughput: the Ray Data pipeline (``run_ray``) vs a plain loop (``run_plain``).

Both paths run the same UIFace sampler, batch size and work units end to end (model build, sampling, PNG
encode, shard write, manifest commit) and print one JSON object. On CUDA it also reports UNet model-FLOPs
utilisation: FLOPs of one UNet forward row (``torch.utils.flop_counter.FlopCounterMode``) x UNet rows per
image (counted on a real sampling call) x images/s / peak FLOP/s.

    python -m bench.generate_throughput                      # CPU: tiny preset, 10 DDIM steps
    python -m bench.generate_throughput --preset uiface-casia --device cuda --steps 50 --batch 64 --images 1024
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.host import host_info
from facesynth.runtime import RayConfig, init_ray
from jobs.generate import GenerateConfig, prepare
from synthgen.stage import StageConfig, StageResult, run_plain, run_ray
from synthgen.uiface.generator import IdentitiesConfig, UIFaceFactory, UIFaceGenerator
from synthgen.uiface.model import UIFaceModel
from synthgen.uiface.sampler import SamplerConfig, sample
from synthgen.uiface.train import UIFaceModelSource


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="UIFace architecture preset (random weights)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--mode", default="adaptive", choices=["single", "fixed", "adaptive"])
    p.add_argument("--batch", type=int, default=16, help="images per sampler call (= one work unit)")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--samples-per-identity", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads per generator (cpu default: 1)")
    p.add_argument("--actors", type=int, default=1, help="generator actors (one GPU each on cuda)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100 SXM: 989)")
    p.add_argument("--output", default=None, help="folder for the two datasets (default: a temp dir)")
    args = p.parse_args(argv)
    if args.batch % args.samples_per_identity or args.images % args.batch:
        p.error(
            f"--batch {args.batch} must be a multiple of --samples-per-identity {args.samples_per_identity} "
            f"and --images {args.images} a multiple of --batch"
        )
    return args


def bench_config(args: argparse.Namespace, output: str) -> GenerateConfig:
    cuda = args.device == "cuda"
    return GenerateConfig(
        model=UIFaceModelSource(preset=args.preset),
        sampler=SamplerConfig(mode=args.mode, steps=args.steps),
        identities=IdentitiesConfig(
            count=args.images // args.samples_per_identity,
            samples_per_identity=args.samples_per_identity,
            identities_per_unit=args.batch // args.samples_per_identity,
        ),
        stage=StageConfig(
            batch_size=args.batch,
            num_gpus=1.0 if cuda else 0.0,
            num_cpus=1.0,
            min_actors=args.actors,
            max_actors=args.actors,
            encoders_cpus=0.5,
        ),
        output=output,
        device=args.device,
        dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        threads=args.threads if args.threads is not None or cuda else 1,
    )


@dataclass(frozen=True)
class TimedFactory:
    """Builds the generator and records when it was ready (wall clock) in ``stamp``, also inside actors."""

    factory: UIFaceFactory
    stamp: str

    def __call__(self) -> UIFaceGenerator:
        gen = self.factory()
        Path(self.stamp).write_text(repr(time.time()))
        return gen


def timed_run(runner, plan, output: str, stage: StageConfig) -> dict:
    """Run one path; images/s end to end and from the moment the generator was built to the last commit."""
    stamp = f"{output}.ready"
    began = time.time()
    res: StageResult = runner(
        plan.units, TimedFactory(plan.factory, stamp), output, base_seed=plan.base_seed, cfg=stage
    )
    ready = float(Path(stamp).read_text())
    return {
        "images": res.images,
        "seconds": round(res.seconds, 2),
        "images_per_s": round(res.images_per_s, 3),
        "startup_s": round(ready - began, 2),
        "images_per_s_after_startup": round(res.images / (began + res.seconds - ready), 3),
    }


def unet_flops_per_row(model: UIFaceModel, batch: int) -> float:
    """FLOPs of one UNet forward, per batch row, on the model's device and dtype."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.unet.parameters())
    x = torch.randn(batch, *model.latent_shape, device=param.device, dtype=param.dtype)
    tokens = torch.randn(
        batch, model.config.context_tokens, model.config.context_dim, device=param.device, dtype=param.dtype
    )
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.unet(x, 500, encoder_hidden_states=tokens)
    return counter.get_total_flops() / batch


def unet_rows_per_image(model: UIFaceModel, sampler: SamplerConfig, batch: int) -> float:
    """UNet batch rows evaluated per generated image by ``sampler`` (both passes of a step count)."""
    rows = []
    hook = model.unet.register_forward_pre_hook(lambda _module, inputs: rows.append(inputs[0].shape[0]))
    try:
        embeddings = torch.nn.functional.normalize(torch.randn(batch, model.config.embedding_dim), dim=1)
        sample(model, sampler, embeddings, list(range(batch)))
    finally:
        hook.remove()
    return sum(rows) / batch


def run(args: argparse.Namespace, root: str) -> dict:
    init_ray(RayConfig())
    cfg = bench_config(args, root)
    paths = {}
    for name, runner in (("plain", run_plain), ("ray", run_ray)):
        output = str(Path(root, name))
        paths[name] = timed_run(runner, prepare(cfg.model_copy(update={"output": output})), output, cfg.stage)
    model = cfg.model.build(args.device).to(getattr(torch, cfg.dtype))
    flops = unet_flops_per_row(model, min(args.batch, 8)) * unet_rows_per_image(model, cfg.sampler, 2)
    for name, res in paths.items():
        gpus = args.actors if name == "ray" else 1
        for key in ("images_per_s", "images_per_s_after_startup"):
            achieved = flops * res[key]
            res[key.replace("images_per_s", "unet_tflops_per_s")] = round(achieved / 1e12, 4)
            if args.device == "cuda":
                res[key.replace("images_per_s", "images_per_s_per_gpu")] = round(res[key] / gpus, 3)
                res[key.replace("images_per_s", "unet_mfu")] = round(achieved / (args.peak_tflops * 1e12), 4)
    plain, ray = paths["plain"], paths["ray"]
    return {
        "bench": "generate_throughput",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "preset": args.preset,
        "mode": args.mode,
        "scheduler": cfg.sampler.scheduler,
        "steps": args.steps,
        "batch": args.batch,
        "dtype": cfg.dtype,
        "threads_per_generator": cfg.threads,
        "actors": args.actors,
        "unet_gflops_per_image": round(flops / 1e9, 3),
        "plain": plain,
        "ray": ray,
        "ray_over_plain": round(ray["images_per_s"] / plain["images_per_s"], 3),
        "ray_over_plain_after_startup": round(
            ray["images_per_s_after_startup"] / plain["images_per_s_after_startup"], 3
        ),
        **host_info("torch", "diffusers", "ray"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.output:
        print(json.dumps(run(args, args.output), indent=1))
        return
    with tempfile.TemporaryDirectory() as root:
        print(json.dumps(run(args, root), indent=1))


if __name__ == "__main__":
    main()
