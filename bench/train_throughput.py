"""Training throughput (img/s): our Ray Train step vs a plain single-process PyTorch loop, as JSON.

Both sides run the same :class:`recog.train.loop.Learner` step (backbone + ArcFace head, SGD,
gradient clipping, optional bf16 autocast / channels_last) on the same synthetic uint8 images:
"ours" streams them through Ray Data into a 1-worker ``TorchTrainer`` (``iter_torch_batches``),
"plain" loops over tensors already in memory. Only steps after ``--warmup`` are timed.

    python -m bench.train_throughput --backbone iresnet50 --size 112 --batch 8 --steps 4 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from bench.host import host_info
from facesynth.config import load_config
from recog.train.config import TrainFRJob
from recog.train.loop import Learner

NUM_CLASSES = 1000


def synthetic_batch(batch: dict, size: int) -> dict:
    """Deterministic uint8 images ``(N, 3, size, size)`` and labels for the row ids in ``batch["id"]``."""
    ids = batch["id"].astype(np.int64)
    rng = np.random.default_rng(int(ids[0]))
    images = rng.integers(0, 256, (len(ids), 3, size, size), dtype=np.uint8)
    return {"image": images, "label": ids % NUM_CLASSES}


def bench_config(args: argparse.Namespace) -> TrainFRJob:
    return load_config(
        TrainFRJob,
        None,
        [
            "output=/tmp/unused",
            "data.datasets=[{uri: /tmp/unused}]",
            f"model.backbone={args.backbone}",
            f"model.input_size={args.size}",
            f"model.width={args.width}",
            "model.head=arcface",
            f"train.batch_size={args.batch}",
            f"train.steps={args.warmup + args.steps}",
            f"train.precision={args.precision}",
            f"train.channels_last={args.channels_last}",
            f"scaling.use_gpu={args.device == 'cuda'}",
            f"scaling.cpus_per_worker={args.threads}",
        ],
    )


def timed_steps(learner: Learner, batches, warmup: int, batch_size: int, device: torch.device) -> float:
    """img/s over the batches after the first ``warmup`` (synchronising the GPU around the timing)."""
    start = None
    for n, batch in enumerate(batches):
        if n == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, count = time.perf_counter(), 0
        learner.step(
            batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        )
        if start is not None:
            count += batch_size
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def plain_loop(args: argparse.Namespace) -> float:
    """The baseline: one process, batches already in memory as tensors."""
    cfg = bench_config(args)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    learner = Learner(cfg, NUM_CLASSES, device)
    total = args.warmup + args.steps
    batches = [
        {
            k: torch.from_numpy(v)
            for k, v in synthetic_batch({"id": np.arange(i, i + args.batch)}, args.size).items()
        }
        for i in range(0, total * args.batch, args.batch)
    ]
    return timed_steps(learner, batches, args.warmup, args.batch, device)


def _worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    args = argparse.Namespace(**config)
    cfg = bench_config(args)
    torch.set_num_threads(args.threads)
    device = ray.train.torch.get_device()
    learner = Learner(cfg, NUM_CLASSES, device)
    batches = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=args.batch,
        drop_last=True,
        prefetch_batches=4,
        device=device,
        dtypes={"image": torch.uint8, "label": torch.int64},
    )
    rate = timed_steps(learner, batches, args.warmup, args.batch, device)
    with tempfile.TemporaryDirectory() as folder:  # Ray Train V2 keeps metrics only with a checkpoint
        ray.train.report({"images_per_s": rate}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def ours(args: argparse.Namespace) -> float:
    """The same step in a 1-worker TorchTrainer fed by Ray Data."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    rows = (args.warmup + args.steps) * args.batch
    ds = ray.data.range(rows, override_num_blocks=max(1, rows // (args.batch * 4))).map_batches(
        synthetic_batch, fn_kwargs={"size": args.size}, batch_size=args.batch, batch_format="numpy"
    )
    trainer = TorchTrainer(
        _worker,
        train_loop_config=vars(args),
        datasets={"train": ds},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=args.device == "cuda", resources_per_worker={"CPU": args.threads}
        ),
        run_config=ray.train.RunConfig(name=f"train-throughput-{os.getpid()}", storage_path=args.storage),
    )
    return trainer.fit().metrics["images_per_s"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="iresnet50")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads (and Ray CPUs) of the training process"
    )
    parser.add_argument("--storage", default="/tmp/facesynth-bench", help="Ray Train storage path")
    parser.add_argument("--skip-ours", action="store_true", help="time only the plain loop")
    args = parser.parse_args(argv)
    result = {k: v for k, v in vars(args).items() if k not in ("storage", "skip_ours")}
    result["plain_img_s"] = round(plain_loop(args), 2)
    if not args.skip_ours:
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
        result["ours_img_s"] = round(ours(args), 2)
        result["ratio"] = round(result["ours_img_s"] / result["plain_img_s"], 3)
    result.update(host_info("torch", "ray"))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
