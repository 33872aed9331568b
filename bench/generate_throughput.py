"""Generation throughput. UIFace: the Ray Data pipeline (``run_ray``) vs a plain loop (``run_plain``);
SD + LoRA (``--generator sd-lora``): our generator vs a plain diffusers pipeline loop at equal batch.

Both paths run the same UIFace sampler, batch size and work units end to end (model build, sampling, PNG
encode, shard write, manifest commit) and print one JSON object. On CUDA it also reports UNet model-FLOPs
utilisation: FLOPs of one UNet forward row (``torch.utils.flop_counter.FlopCounterMode``) x UNet rows per
image (counted on a real sampling call) x images/s / peak FLOP/s.

    python -m bench.generate_throughput                      # CPU: tiny preset, 10 DDIM steps
    python -m bench.generate_throughput --preset uiface-casia --device cuda --steps 50 --batch 64 --images 1024

SD + LoRA, random weights with a random rank-4 LoRA (``--arch tiny``: diffusers' SD 2 test shapes at 32 px;
``--arch sd21``: the SD 2.1-base architecture at 512 px). The plain loop is what a diffusers user writes:
``from_pretrained`` + ``load_lora_weights`` (unfused), then ``pipe(prompts, generator=...)`` per batch. Ours is
``SDLoraGenerator.generate`` over the same prompts and batch (one generator per row), and the whole stage
(``run_plain``: also PNG encode and shard writes). On CUDA ours adds what pays there: fp16, LoRA fused into
the weights, channels-last UNet and ``torch.compile`` (``--no-compile`` to leave it out).

    python -m bench.generate_throughput --generator sd-lora                  # CPU: tiny, 10 DDIM steps, CFG 5
    python -m bench.generate_throughput --generator sd-lora --arch sd21 --device cuda --steps 50 --batch 16 --images 128
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.host import host_info
from facesynth.runtime import RayConfig, init_ray
from synthgen import generate
from synthgen.stage import Generator, StageConfig, StageResult, UnitPlan, run_plain, run_ray
from synthgen.uiface.model import UIFaceModel
from synthgen.uiface.sampler import SamplerConfig, sample
from synthgen.uiface.train import UIFaceModelSource


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", default="uiface", choices=["uiface", "sd-lora"])
    p.add_argument(
        "--arch", default="tiny", choices=["tiny", "sd21"], help="sd-lora: random-weight architecture"
    )
    p.add_argument(
        "--guidance", type=float, default=None, help="sd-lora CFG scale (default 5 tiny, 7.5 sd21)"
    )
    p.add_argument("--no-compile", action="store_true", help="sd-lora on cuda: no torch.compile of the UNet")
    p.add_argument("--repeats", type=int, default=3, help="sd-lora: interleaved timings of each (best kept)")
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


def bench_config(args: argparse.Namespace, output: str) -> generate.GenerateJob:
    cuda = args.device == "cuda"
    return generate.GenerateJob(
        generator=generate.UIFaceSpec(
            model=UIFaceModelSource(preset=args.preset),
            sampler=SamplerConfig(mode=args.mode, steps=args.steps),
            device=args.device,
            dtype=args.dtype or ("bfloat16" if cuda else "float32"),
            threads=args.threads if args.threads is not None or cuda else 1,
        ),
        identities=UnitPlan(
            count=args.images // args.samples_per_identity,
            samples_per_identity=args.samples_per_identity,
            per_unit=args.batch // args.samples_per_identity,
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
    )


@dataclass(frozen=True)
class TimedFactory:
    """Builds the generator and records when it was ready (wall clock) in ``stamp``, also inside actors."""

    factory: Callable[[], Generator]
    stamp: str

    def __call__(self) -> Generator:
        gen = self.factory()
        Path(self.stamp).write_text(repr(time.time()))
        return gen


def timed_run(runner, plan: generate.GeneratePlan, output: str, job: generate.GenerateJob) -> dict:
    """Run one path; images/s end to end and from the moment the generator was built to the last commit."""
    stamp = f"{output}.ready"
    began = time.time()
    res: StageResult = runner(
        plan.units,
        TimedFactory(plan.factory, stamp),
        output,
        base_seed=job.seed,
        cfg=job.stage,
        settings=plan.settings,
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
        job = cfg.model_copy(update={"output": output})
        paths[name] = timed_run(runner, generate.plan(job), output, job)
    gen = cfg.generator
    model = gen.model.build(args.device).to(getattr(torch, gen.dtype))
    flops = unet_flops_per_row(model, min(args.batch, 8)) * unet_rows_per_image(model, gen.sampler, 2)
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
        "scheduler": gen.sampler.scheduler,
        "steps": args.steps,
        "batch": args.batch,
        "dtype": gen.dtype,
        "threads_per_generator": gen.threads,
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


def sd_lora_setup(args: argparse.Namespace, root: str) -> dict:
    """A random-weight base pipeline folder, a random LoRA folder and our generator's factory."""
    from synthgen.sd_lora.checkpoint import (
        SD21_BASE,
        PipelineSource,
        TinyPipeline,
        load_pipeline,
        save_tiny_pipeline,
    )
    from synthgen.sd_lora.generator import SDLoraFactory, SDSampling
    from synthgen.sd_lora.lora import LoraSettings, add_adapters, save_lora
    from synthgen.sd_lora.prompts import load_prompt_set

    arch = TinyPipeline(**(SD21_BASE if args.arch == "sd21" else {}))
    base = save_tiny_pipeline(arch, str(Path(root, "base")))
    pipe = load_pipeline(base)
    add_adapters(pipe, LoraSettings())
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.01)  # a trained-looking LoRA (B = 0 at init)
    lora = save_lora(pipe, str(Path(root, "lora")), {})
    del pipe
    cuda = args.device == "cuda"
    sampling = SDSampling(
        steps=args.steps,
        guidance_scale=args.guidance if args.guidance is not None else (7.5 if args.arch == "sd21" else 5.0),
        scheduler="ddim",
        resolution=arch.image_size,
    )
    factory = SDLoraFactory(
        base=PipelineSource(path=base),
        lora=lora,
        prompts=load_prompt_set("cross-domain").model_copy(
            update={"images_per_template": args.images}
        ),  # enough
        sampling=sampling,
        device=args.device,
        dtype=args.dtype or ("float16" if cuda else "float32"),
        threads=args.threads if args.threads is not None or cuda else 1,
        fuse_lora=cuda,
        channels_last=cuda,
        compile=cuda and not args.no_compile,
    )
    return {"base": base, "lora": lora, "factory": factory, "sampling": sampling}


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _images_per_s(call, batches: list, device: str) -> float:
    """Images/s of ``call(batch)`` over ``batches`` after one warm-up call (compilation, allocator)."""
    call(batches[0])
    _synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        call(batch)
    _synchronize(device)
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - start)


def run_sd_lora(args: argparse.Namespace, root: str) -> dict:
    """Ours (generator calls; the whole stage) vs the plain diffusers loop, same prompts, batch and steps."""
    import numpy as np

    from facesynth import shards
    from synthgen.sd_lora.checkpoint import load_pipeline

    setup = sd_lora_setup(args, root)
    factory, sampling = setup["factory"], setup["sampling"]
    people = len(factory.prompts.people)
    ids = np.arange(args.images) % people
    samples = np.arange(args.images) // people % factory.prompts.samples_per_person
    seeds = shards.row_seeds(0, ids, samples)
    batches = [
        (ids[i : i + args.batch], samples[i : i + args.batch], seeds[i : i + args.batch])
        for i in range(0, args.images, args.batch)
    ]
    if args.threads is not None or args.device == "cpu":
        torch.set_num_threads(factory.threads or 1)
    plain = load_pipeline(setup["base"], dtype=factory.dtype)
    plain.load_lora_weights(setup["lora"])
    plain.to(args.device)
    ours = factory()
    prompts = {id(b): [t for _, _, t in ours.rows(b[0], b[1])] for b in batches}

    def plain_call(batch) -> None:
        plain(
            prompts[id(batch)],
            generator=torch.Generator().manual_seed(int(batch[2][0])),
            num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            height=sampling.resolution,
            width=sampling.resolution,
            output_type="np",
        )

    best = {"plain": 0.0, "ours": 0.0}
    for _ in range(args.repeats):  # interleaved, best of each: the box is shared, load comes and goes
        best["plain"] = max(best["plain"], _images_per_s(plain_call, batches, args.device))
        best["ours"] = max(best["ours"], _images_per_s(lambda b: ours.generate(*b), batches, args.device))
    result = {f"{k}_images_per_s": round(v, 3) for k, v in best.items()}
    plain = ours = None  # free them before the stage run
    per_person = max(1, args.images // (people * args.batch)) * args.batch  # whole batches per unit
    job_units = shards.plan_units(people, per_person, 1)
    stamp = str(Path(root, "stage.ready"))
    began = time.time()
    stage = run_plain(
        job_units,
        TimedFactory(factory, stamp),
        str(Path(root, "stage")),
        base_seed=0,
        cfg=StageConfig(batch_size=args.batch, commit_every_s=0),
        settings={"bench": "sd-lora"},
    )
    ready = float(Path(stamp).read_text())
    result["ours_stage_images_per_s"] = round(stage.images_per_s, 3)
    result["ours_stage_images_per_s_after_load"] = round(stage.images / (began + stage.seconds - ready), 3)
    return {
        "bench": "generate_throughput",
        "generator": "sd-lora",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "arch": args.arch,
        "resolution": sampling.resolution,
        "steps": sampling.steps,
        "guidance_scale": sampling.guidance_scale,
        "batch": args.batch,
        "images": args.images,
        "repeats": args.repeats,
        "dtype": factory.dtype,
        "ours_options": {
            "fuse_lora": factory.fuse_lora,
            "channels_last": factory.channels_last,
            "compile": factory.compile,
        },
        **result,
        "ours_over_plain": round(result["ours_images_per_s"] / result["plain_images_per_s"], 3),
        "stage_after_load_over_plain": round(
            result["ours_stage_images_per_s_after_load"] / result["plain_images_per_s"], 3
        ),
        **host_info("torch", "diffusers", "peft"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench = run_sd_lora if args.generator == "sd-lora" else run
    if args.output:
        print(json.dumps(bench(args, args.output), indent=1))
        return
    with tempfile.TemporaryDirectory() as root:
        print(json.dumps(bench(args, root), indent=1))


if __name__ == "__main__":
    main()
