"""Memory per process of a full fine-tune step of a U-Net: DDP against FSDP2 ZeRO-2 and ZeRO-3 style.

    python benchmarks/bench_fsdp.py --preset small --processes 2

Each setting runs in its own processes (over gloo on a CPU, NCCL on GPUs is not this script's business):
build the preset's U-Net (random weights), wrap it (DDP) or shard it (training/sharding.py, as train.py
does), then take ``--steps`` AdamW steps at the preset's latent size, batch 1. Reported per process:
the bytes of parameters, gradients and AdamW state it holds (counted from its tensors, exact) and its
peak resident memory above what it held before the model was built (ru_maxrss: weights, gradients,
optimizer state, activations, gathered blocks and the allocator's slack together).
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlite.presets import get_preset  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.sharding import Sharding, held, optimizer_tensors, shard_model  # noqa: E402
from training.unet_step import Denoiser  # noqa: E402

MB = 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(rank: int, world: int, port: int, mode: str, preset: str, steps: int, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel

    p = get_preset(preset)
    before = peak_mb()
    torch.manual_seed(0)
    model = Denoiser(UNet2DConditionModel(**p.config("unet")))
    if mode == "DDP":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        shard_model(model, Sharding(reshard_after_forward=mode == "ZeRO-3"))
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = make_optimizer(params, lr=1e-4)
    size, width = p.latent_size, p.unet["cross_attention_dim"]
    for _ in range(steps):
        x = torch.randn(1, p.unet.get("in_channels", 4), size, size)
        model(x, torch.tensor([500]), torch.randn(1, p.max_length, width)).pow(2).mean().backward()
        grads = held(q.grad for q in params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = {
        "parameters": held(params)[0] * 4 / MB,
        "gradients": grads[0] * 4 / MB,
        "optimizer": held(optimizer_tensors(optimizer))[0] * 4 / MB,
        "peak": peak_mb() - before,
        "whole parameters": held(params)[1] * 4 / MB,
    }
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    print(f"| {args.preset}, {args.processes} processes | parameters MB | gradients MB | AdamW state MB | "
          "peak MB above start |")  # fmt: skip
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for mode in ("DDP", "ZeRO-2", "ZeRO-3"):
            mp.spawn(worker, args=(args.processes, free_port(), mode, args.preset, args.steps, out),
                     nprocs=args.processes)  # fmt: skip
            r = json.loads(Path(out, f"{mode}-0.json").read_text())  # process 0; the others alike
            print(f"| {mode} | {r['parameters']:.0f} | {r['gradients']:.0f} | {r['optimizer']:.0f} | "
                  f"{r['peak']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
