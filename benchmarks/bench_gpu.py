"""GPU benchmark, sdlite against diffusers on the sd15 preset (random weights, bf16, SDPA attention).

    python benchmarks/bench_gpu.py                                          # an H100: the full run
    python benchmarks/bench_gpu.py --preset tiny --device cpu --steps 2     # smoke run on a CPU

1. U-Net training step at latents 32 and 64 (256 and 512 px): images/s, peak memory and MFU. Ours is
   train.py's step (``training.unet_step.optimizer_step`` after ``setup`` on a warm latent and text
   cache); the reference is ``bench_train.run_reference``, a step written to do what diffusers'
   train_text_to_image.py does (decode and augment images, VAE and CLIP encode, U-Net, AdamW).
   MFU = F x images/s / peak, where F is the U-Net's FLOPs per image for one forward and backward,
   counted once with torch.utils.flop_counter.FlopCounterMode, and peak the chip's dense bf16 rate
   (--peak-tflops; 989 for an H100 SXM). Only U-Net FLOPs count as useful, so the reference's VAE and
   text-encoder work, which the cache saves, lowers its MFU.
2. Text-to-image, 50 DDPM steps, guidance 7.5, batch 1 and 8: ours (pipelines.TextToImagePipeline)
   against diffusers' StableDiffusionPipeline on the same weights, each with and without
   torch.compile of the U-Net (``bench_pipeline.make_pipelines``).
3. LoRA training (rank 4 on the U-Net's attention projections, gradient checkpointing) at the
   preset's resolution: train.py --lora against a step written after diffusers'
   train_text_to_image_lora.py (frozen base in bf16, adapters in fp32, VAE and CLIP encode per step;
   its images are decoded once up front, so its images/s leaves out the image decoding).

4. ``--memory``: only the memory table of benchmarks/bench_memory.py on this GPU (peak
   torch.cuda.max_memory_allocated of a step and its parts: weights, gradients, optimizer state,
   activations; each memory lever in turn; beside steps after diffusers' train_text_to_image_lora.py
   and train_text_to_image_lora_sdxl.py): sd15 at 512 px and sdxl at 1024 px, LoRA and full.

Each variant runs in a fresh subprocess, so its peak memory (torch.cuda.max_memory_allocated; RSS on
a CPU) is its own. The tables print as markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def preset_at(name: str, px: int) -> str:
    """The name of ``name`` at ``px`` pixels, registered in sdlite.presets (in this process only)."""
    from sdlite.presets import PRESETS, get_preset

    preset = get_preset(name)
    if px == preset.resolution:
        return name
    key = f"{name}@{px}"
    vae, unet = {**preset.vae, "sample_size": px}, {**preset.unet, "sample_size": px // preset.vae_factor}
    PRESETS[key] = replace(preset, name=key, resolution=px, vae=vae, unet=unet)
    return key


def unet_flops(preset: str, latent: int, device: str = "cpu", backward: bool = True) -> int:
    """FLOPs of the preset U-Net on one image at ``latent`` x ``latent``: forward, and backward too.

    Attention runs on SDPA's math backend here: its matmuls are what FlopCounterMode counts, while
    the fused CPU kernel has no FLOP formula (the CUDA flash and efficient ones do, with the same count).
    """
    import torch
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sdlite.presets import get_preset

    p = get_preset(preset)
    unet = UNet2DConditionModel(**p.config("unet")).to(device)
    x = torch.randn(1, unet.config.in_channels, latent, latent, device=device)
    text = torch.randn(1, p.max_length, unet.config.cross_attention_dim, device=device)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = unet(x, torch.tensor([500], device=device), encoder_hidden_states=text).sample
        if backward:
            out.float().pow(2).mean().backward()
    return counter.get_total_flops()


def peak_memory_gb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- the variants, each run in its own process -------------------------------------------------------


def train_args(args, px: int) -> SimpleNamespace:
    """The arguments bench_train's functions read."""
    return SimpleNamespace(preset=preset_at(args.preset, px), data=f"{args.work}/data-{px}", batch=args.batch,
                           steps=args.steps, warmup=args.warmup, cache=f"{args.work}/cache",
                           out=f"{args.work}/run-{args.child}-{px}", threads=args.threads)  # fmt: skip


def run_train(args) -> dict:
    import bench_train

    a = train_args(args, args.px)
    if args.child == "warm":
        return bench_train.warm_cache(a)
    return {"reference": bench_train.run_reference, "ours": bench_train.run_ours}[args.variant](a)


def run_lora_ours(args) -> dict:
    import bench_train

    from training.train import UNetTrainer

    a = train_args(args, args.px)
    cfg = bench_train.ours_config(a, args.warmup + args.steps)
    cfg.adapters.lora, cfg.adapters.lora_from_scratch = True, True  # random weights: a timing
    cfg.run.gradient_checkpointing = True
    trainer = UNetTrainer(cfg)
    seconds = bench_train.timed_steps(trainer.optimizer_step, a, trainer.accelerator.device)
    return {"seconds": seconds, "device": trainer.accelerator.device}


def run_lora_reference(args) -> dict:
    """One step of diffusers' LoRA script: frozen base in the mixed-precision dtype, fp32 adapters."""
    import bench_train
    import datasets
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from sdlite.data.dataset import ImageTransform, image_bytes, load_rows
    from sdlite.models import build_components

    a = train_args(args, args.px)
    accelerator = Accelerator()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    parts = build_components(a.preset, seed=0)
    vae, text_encoder, unet, tokenizer = parts.vae, parts.text_encoder, parts.unet, parts.tokenizer
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False).to(accelerator.device, dtype=dtype)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))  # fmt: skip
    cast_training_params(unet, dtype=torch.float32)
    unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    noise_scheduler = DDPMScheduler.from_config(parts.scheduler.config)
    rows = load_rows(a.data).cast_column("image", datasets.Image(decode=False))
    transform = ImageTransform(args.px)
    pool = [transform(image_bytes(rows[i]["image"]), i) for i in range(min(len(rows), 4 * a.batch))]
    ids = tokenizer(rows["text"][: len(pool)], max_length=tokenizer.model_max_length, padding="max_length",
                    truncation=True, return_tensors="pt").input_ids  # fmt: skip

    def step(i):
        take = [(i * a.batch + k) % len(pool) for k in range(a.batch)]
        pixels = torch.stack([pool[k] for k in take]).to(accelerator.device, dtype=dtype)
        with accelerator.accumulate(unet):
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (a.batch,), device=latents.device)
            hidden = text_encoder(ids[take].to(accelerator.device), return_dict=False)[0]
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, hidden, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
            accelerator.gather(loss.repeat(a.batch)).mean().item()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_([p for p in unet.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad()

    return {"seconds": bench_train.timed_steps(step, a, accelerator.device), "device": accelerator.device}


def run_text_to_image(args) -> dict:
    """Seconds per call at batch 1 and 8 for one pipeline, compiled or not (peak memory per batch)."""
    import bench_pipeline
    import torch

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    pipe = bench_pipeline.make_pipelines(args.preset)[args.variant].to(device, dtype)
    if args.compile:
        pipe.unet.compile()
    result = {"device": device}
    for batch in args.t2i_batches:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):  # the first call compiles, at each batch size
            bench_pipeline.generate(pipe, args.inference_steps, batch)
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            bench_pipeline.generate(pipe, args.inference_steps, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result[f"seconds_{batch}"] = statistics.median(times)
        result[f"peak_{batch}"] = peak_memory_gb(device)
    return result


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "flops":
        result = {str(n): unet_flops(args.preset, n, args.device) for n in args.latents}
    else:
        run = {"warm": run_train, "train": run_train, "lora": run_lora_ours, "t2i": run_text_to_image}
        if args.child == "lora" and args.variant == "reference":
            run["lora"] = run_lora_reference
        result = run[args.child](args)
        result.setdefault("peak_gb", peak_memory_gb(result["device"]))
        result["device"] = str(result["device"])
    print("RESULT " + json.dumps(result), flush=True)


# ---- the parent: spawn, collect, print ---------------------------------------------------------------


def spawn(args, child_name: str, **extra) -> dict:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
    command = [
        sys.executable,
        __file__,
        *sys.argv[1:],
        f"--child={child_name}",
        f"--work={args.work}",
        *flags,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               ACCELERATE_MIXED_PRECISION=args.precision)  # fmt: skip
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{child_name} {extra} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    print(f"  {child_name} {extra}: done", flush=True)
    return json.loads(lines[-1][len("RESULT ") :])


def measure(args) -> dict:
    from sdlite.data.shapes import write_dataset
    from sdlite.presets import get_preset

    factor = get_preset(args.preset).vae_factor
    flops = {int(k): v for k, v in spawn(args, "flops").items()}
    train = []
    for latent in args.latents:
        px = latent * factor
        write_dataset(Path(args.work) / f"data-{px}", count=args.images, seed=0, image_size=px)
        spawn(args, "warm", px=px)
        for variant in ("reference", "ours"):
            r = spawn(args, "train", px=px, variant=variant)
            speed = args.batch * args.steps / r["seconds"]
            mfu = flops[latent] * speed / (args.peak_tflops * 1e12)
            train.append(dict(variant=variant, latent=latent, px=px, speed=speed, peak=r["peak_gb"], mfu=mfu))
    t2i = [dict(variant=v, compile=c, **spawn(args, "t2i", variant=v, compile=c))
           for c in (False, True) for v in ("diffusers", "sdlite")]  # fmt: skip
    px = get_preset(args.preset).resolution
    if not (Path(args.work) / f"data-{px}").exists():
        write_dataset(Path(args.work) / f"data-{px}", count=args.images, seed=0, image_size=px)
        spawn(args, "warm", px=px)
    lora = [dict(variant=v, px=px, **spawn(args, "lora", px=px, variant=v)) for v in ("reference", "ours")]
    return dict(flops=flops, train=train, t2i=t2i, lora=lora)


def report(args, results: dict) -> None:
    ours, ref = "sdlite", "diffusers-style reference"
    print(f"\n### U-Net training step ({args.preset}, batch {args.batch}, {args.precision})\n")
    print("| latents (px) | loop | images/s | peak memory GiB | U-Net GFLOP/image (fwd+bwd) | MFU |")
    print("|---|---|---|---|---|---|")
    for r in results["train"]:
        name = ours if r["variant"] == "ours" else ref
        gflop = results["flops"][r["latent"]] / 1e9
        print(f"| {r['latent']} ({r['px']}) | {name} | {r['speed']:.2f} | {r['peak']:.2f} | {gflop:.1f} "
              f"| {100 * r['mfu']:.3g}% |")  # fmt: skip
    print(f"\n### Text-to-image ({args.inference_steps} steps, guidance 7.5)\n")
    batches = args.t2i_batches
    print(
        "| pipeline | torch.compile | "
        + " | ".join(f"batch {b}: s/call, images/s, GiB" for b in batches)
        + " |"
    )
    print("|---|---|" + "---|" * len(batches))
    for r in results["t2i"]:
        cells = [
            f"{r[f'seconds_{b}']:.3f}, {b / r[f'seconds_{b}']:.2f}, {r[f'peak_{b}']:.2f}" for b in batches
        ]
        print(f"| {r['variant']} | {'yes' if r['compile'] else 'no'} | " + " | ".join(cells) + " |")
    print(f"\n### LoRA training, rank 4, gradient checkpointing (batch {args.batch})\n")
    print("| px | loop | images/s | peak memory GiB |\n|---|---|---|---|")
    for r in results["lora"]:
        name = ours if r["variant"] == "ours" else ref
        print(f"| {r['px']} | {name} | {args.batch * args.steps / r['seconds']:.2f} | {r['peak_gb']:.2f} |")


# bench_memory.py's runs on a GPU: SD 1.5 at 512 px in fp32 (as the CPU rows), SDXL at 1024 px with its
# base in bf16 (mixed precision), and both models' full fine-tunes with each optimizer.
MEMORY_RUNS = [
    ["--model", "sd15"],
    ["--model", "sd15", "--mode", "full"],
    ["--model", "sdxl", "--precision", "bf16"],
    ["--model", "sdxl", "--mode", "full", "--precision", "bf16", "--keys", '{"gradient_checkpointing": 1}'],
]


def memory_table(args) -> None:
    for flags in MEMORY_RUNS:
        command = [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--device", args.device,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), *flags]  # fmt: skip
        print("$ " + " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    parser.add_argument(
        "--latents", default=None, help="comma-separated; default 32,64 (sd15) or the preset's"
    )
    parser.add_argument("--batch", type=int, default=None, help="training batch; default 8 (cuda) or 2")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--t2i-batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=None, help="timed text-to-image calls; 5 (cuda) or 1")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16; 989: H100 SXM")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="only bench_memory.py's table, on this device")
    for hidden in ("child", "work", "variant", "px", "compile"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    latents = args.latents or ("32,64" if args.preset == "sd15" else None)
    if latents is None:
        from sdlite.presets import get_preset

        n = get_preset(args.preset).latent_size
        latents = f"{n},{2 * n}"
    args.latents = [int(n) for n in latents.split(",")]
    args.t2i_batches = [int(b) for b in args.t2i_batches.split(",")]
    args.batch = args.batch or (8 if cuda else 2)
    args.repeats = args.repeats or (5 if cuda else 1)
    args.images = args.images or max(64, 4 * args.batch)
    args.threads = args.threads or (os.cpu_count() if cuda else 1)
    args.px = int(args.px) if args.px else None
    args.compile = args.compile == "True"
    if args.child:
        return child(args)
    if args.memory:
        return memory_table(args)

    import diffusers
    import torch

    args.work = tempfile.mkdtemp(prefix="bench_gpu_")
    chip = torch.cuda.get_device_name() if cuda else platform.processor() or "CPU"
    print(f"{chip}; torch {torch.__version__}, diffusers {diffusers.__version__}, Python "
          f"{platform.python_version()}; preset {args.preset}, {args.precision}, SDPA; MFU against "
          f"{args.peak_tflops:g} TFLOP/s", flush=True)  # fmt: skip
    try:
        results = measure(args)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    report(args, results)


if __name__ == "__main__":
    main()
