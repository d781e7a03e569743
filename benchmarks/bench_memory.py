"""Memory of one training step at real size: the sd15 and sdxl presets, random weights, batch 1.

    python benchmarks/bench_memory.py --model sd15                 # LoRA at 512 px, each lever in turn
    python benchmarks/bench_memory.py --model sdxl --px 512        # SDXL LoRA (said: not 1024) on a CPU
    python benchmarks/bench_memory.py --count                      # full fine-tunes' parts, counted

Each row runs in a fresh subprocess, one after another, so its memory is its own. Rows add one lever
each to the row before (``LEVERS``), so the last holds them all; the peer is bench_gpu.py's step after
diffusers' ``train_text_to_image_lora.py`` (frozen base in the mixed-precision dtype, fp32 adapters,
gradient checkpointing, VAE and CLIP encode per step), run in the same invocation.

What a row reports, in MB:
- step peak: the process's peak resident memory during the timed steps (on a CPU: VmHWM, reset through
  /proc/self/clear_refs after setup, so the set-up's peak, such as building fp32 weights before they
  are cast, is not counted; it is reported apart as set-up peak) or torch.cuda.max_memory_allocated;
- weights: every parameter and buffer of the models still held, counted from the tensors;
- gradients: the trained parameters' sizes (each has a gradient from backward to the optimizer step);
- optimizer: the optimizer's state tensors after the steps;
- activations: step peak - memory before the first step - gradients - optimizer: what the forward
  keeps for the backward and the step's temporaries (on a CPU also allocator slack);
- runtime: the process's memory after importing torch and diffusers, before any model (CPU only).

``--count`` builds each preset's U-Net on the meta device and prints what a full fine-tune's weights,
gradients and optimizer state take for each optimizer, from the parameter count: SDXL's in fp32 with
AdamW (41 GB) cannot run on this 24 GB machine.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

MB = 2**20
# Cumulative: each row is the one before with one more key (flat config keys, as YAML and flags name them).
LEVERS = [
    ("LoRA, fp32 base", {}),
    ("+ gradient_checkpointing", {"gradient_checkpointing": True}),
    ("+ lora_base_dtype bf16", {"lora_base_dtype": "bf16"}),
    ("+ release_encoders", {"release_encoders": True}),
    ("lora_base_dtype fp8 instead", {"lora_base_dtype": "fp8"}),
]
# The same levers in three rows, for a CPU too slow for five: none, all, and fp8 in place of bf16.
SHORT = [
    ("LoRA, fp32 base", {}),
    ("+ gradient_checkpointing, lora_base_dtype bf16, release_encoders",
     {"gradient_checkpointing": True, "lora_base_dtype": "bf16", "release_encoders": True}),
    ("lora_base_dtype fp8 instead", {"lora_base_dtype": "fp8"}),
]  # fmt: skip
SHORT_XL = [
    (
        "LoRA, bf16 base, gradient_checkpointing, release_encoders",
        {"gradient_checkpointing": True, "release_encoders": True},
    )
]
# A full fine-tune's optimizers, each instead of the first (not cumulative).
FULL = [
    ("full, AdamW fused", {}),
    ("optimizer_kernel foreach", {"optimizer_kernel": "foreach"}),
    ("optimizer_kernel loop", {"optimizer_kernel": "loop"}),
    ("use_8bit_adam", {"use_8bit_adam": True}),
]
# SDXL's U-Net in fp32 is 10 GB: its rows start from mixed precision (--precision bf16), the base in bf16.
LEVERS_XL = [
    ("LoRA, bf16 base, gradient_checkpointing", {"gradient_checkpointing": True}),
    ("+ release_encoders", {"release_encoders": True}),
    ("+ lora_base_dtype fp8", {"lora_base_dtype": "fp8"}),
]


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def start_peak(device) -> float:
    """Free what set-up left, reset the peak, and return the memory now (the steps' baseline)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / MB
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed small blocks back to the system
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    return rss_mb()


def peak(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / MB if device.type == "cuda" else rss_mb("VmHWM")


def tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / MB


def parts_mb(models: list, optimizer) -> dict:
    """Weights, gradients and optimizer state, counted from the tensors."""
    import torch

    models = [m for m in models if isinstance(m, torch.nn.Module)]  # a released encoder is not
    weights = {id(t): t for m in models for t in (*m.parameters(), *m.buffers())}
    trained = [p for m in models for p in m.parameters() if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return dict(weights=tensor_mb(weights.values()), gradients=tensor_mb(trained), optimizer=tensor_mb(state))


def measured_steps(step, a, device, models: list, optimizer) -> dict:
    """bench_train.timed_steps with the memory around it."""
    import bench_train

    setup_peak = peak(device)
    before = start_peak(device)
    seconds = bench_train.timed_steps(step, a, device)
    result = dict(s_per_step=seconds / a.steps, step_peak=peak(device), before=before, setup_peak=setup_peak)
    result.update(parts_mb(models, optimizer))
    result["activations"] = result["step_peak"] - before - result["gradients"] - result["optimizer"]
    return result


# ---- the rows, each run in its own process ------------------------------------------------------------


def step_args(args) -> SimpleNamespace:
    """The arguments bench_train's and bench_gpu's functions read, for args.model at args.px."""
    import bench_gpu

    preset = bench_gpu.preset_at(args.model, args.px)
    return SimpleNamespace(preset=preset, data=f"{args.work}/data-{args.px}", batch=1, steps=args.steps,
                           warmup=args.warmup, cache=f"{args.work}/cache", out=f"{args.work}/run",
                           threads=args.threads, px=args.px)  # fmt: skip


def set_keys(cfg, keys: dict) -> None:
    """Flat keys into their sections."""
    for key, value in keys.items():
        section = next(s for s in cfg.sections() if hasattr(s, key))
        setattr(section, key, value)


def is_xl(args) -> bool:
    from sdlite.presets import PresetXL, get_preset

    return isinstance(get_preset(args.model), PresetXL)


def build_xl_low(args) -> None:
    """SDXL's family builds its U-Net and text encoders in the mixed-precision dtype (see build_xl_in)."""
    import torch

    import training.family_sdxl as family_sdxl

    if is_xl(args) and args.precision == "bf16":
        family_sdxl.build_components_xl = build_xl_in(torch.bfloat16, family_sdxl.build_components_xl)


def run_ours(args) -> dict:
    import bench_train

    from training.train import UNetTrainer

    build_xl_low(args)
    a = step_args(args)
    cfg = bench_train.ours_config(a, a.warmup + a.steps)
    cfg.data.random_flip = False
    keys = json.loads(args.keys)
    if args.mode == "lora":
        keys = {"lora": True, "lora_from_scratch": True, **keys}  # random weights: a measurement
    set_keys(cfg, keys)
    trainer = UNetTrainer(cfg)
    models = [trainer.parts.unet, trainer.parts.vae, *trainer.family.encoders.values()]
    device = trainer.accelerator.device
    return measured_steps(trainer.optimizer_step, a, device, models, trainer.optimizer)


def run_peer(args) -> dict:
    """bench_gpu's step after diffusers' LoRA script; its models and optimizer read from its step."""
    import bench_gpu
    import bench_train

    timed = bench_train.timed_steps

    def measured(step, a, device):
        held = inspect.getclosurevars(step).nonlocals
        models = [held["unet"], held["vae"], held["text_encoder"]]
        bench_train.timed_steps = timed
        result.update(measured_steps(step, a, device, models, held["optimizer"]))
        return result["s_per_step"] * a.steps

    result = {}
    bench_train.timed_steps = measured
    bench_gpu.run_lora_reference(SimpleNamespace(**vars(args), preset=args.model, batch=1))
    return result


def run_peer_xl(args) -> dict:
    """A step after diffusers' train_text_to_image_lora_sdxl.py: U-Net and both text encoders frozen in
    the mixed-precision dtype, the VAE in fp32, fp32 adapters on the U-Net's attention, gradient
    checkpointing; per step VAE encode, both encoders (penultimate states, encoder 2's pooled one),
    the six size and crop numbers, U-Net, MSE, backward, clipping, AdamW."""
    import datasets
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from sdlite.data.dataset import ImageTransform, image_bytes, load_rows
    from sdlite.models_xl import build_components_xl

    a = step_args(args)
    accelerator = Accelerator()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    parts = build_xl_in(dtype, build_components_xl)(a.preset, seed=0)
    vae, unet, encoders = parts.vae, parts.unet, (parts.text_encoder, parts.text_encoder_2)
    for module in (vae, unet, *encoders):
        module.requires_grad_(False).to(accelerator.device)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))  # fmt: skip
    cast_training_params(unet, dtype=torch.float32)
    unet.enable_gradient_checkpointing()
    trained = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    rows = load_rows(a.data).cast_column("image", datasets.Image(decode=False))
    pixels = ImageTransform(args.px)(image_bytes(rows[0]["image"]), 0)[None].to(accelerator.device)
    ids = [t(rows["text"][:1], max_length=t.model_max_length, padding="max_length", truncation=True,
             return_tensors="pt").input_ids.to(accelerator.device)
           for t in (parts.tokenizer, parts.tokenizer_2)]  # fmt: skip
    time_ids = torch.tensor([[args.px, args.px, 0, 0, args.px, args.px]], dtype=dtype).to(accelerator.device)
    scheduler = DDPMScheduler.from_config(parts.scheduler.config)

    def step(i):
        with accelerator.accumulate(unet):
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            latents = latents.to(dtype)
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (1,), device=latents.device)
            with torch.no_grad():
                states = [enc(x, output_hidden_states=True) for enc, x in zip(encoders, ids)]
            embeds = torch.cat([s.hidden_states[-2] for s in states], dim=-1)
            added = {"text_embeds": states[1].text_embeds, "time_ids": time_ids}
            noisy = scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, embeds, added_cond_kwargs=added, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad()

    return measured_steps(step, a, accelerator.device, [unet, vae, *encoders], optimizer)


def build_xl_in(dtype, build):
    """``build`` (sdlite.models_xl.build_components_xl) making the U-Net and text encoders in ``dtype``
    and the VAE in fp32, as both SDXL steps run them: made in fp32 and cast after, SDXL's parts would
    take 14 GB at once, above this machine's share."""
    import torch

    def built(*args, **kwargs):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            parts = build(*args, **kwargs)
        finally:
            torch.set_default_dtype(default)
        parts.vae.float()
        parts.scheduler = type(parts.scheduler).from_config(parts.scheduler.config)  # its tables in fp32
        return parts

    return built


def warm(args) -> dict:
    import bench_train

    build_xl_low(args)
    a = step_args(args)
    start = time.perf_counter()
    bench_train.warm_cache(a)
    return {"seconds": time.perf_counter() - start}


def child(args) -> None:
    import diffusers  # noqa: F401  (the runtime: what a process holds before any model)
    import torch

    torch.set_num_threads(args.threads)
    runtime = rss_mb()
    peer = run_peer_xl if is_xl(args) else run_peer
    result = {"ours": run_ours, "peer": peer, "warm": warm}[args.child](args)
    result["runtime"] = runtime
    print("RESULT " + json.dumps(result), flush=True)


# ---- the parent: one row at a time ------------------------------------------------------------------


def spawn(args, name: str, **extra) -> dict:
    flags = [f"--{k}={v}" for k, v in extra.items()]
    command = [sys.executable, __file__, *sys.argv[1:], f"--child={name}", f"--work={args.work}", *flags]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               ACCELERATE_MIXED_PRECISION=args.precision)  # fmt: skip
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"failed": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1][len("RESULT ") :])


def measure(args) -> list[dict]:
    from sdlite.data.shapes import write_dataset

    write_dataset(Path(args.work) / f"data-{args.px}", count=args.images, seed=0, image_size=args.px)
    spawn(args, "warm", keys="{}")
    rows = []
    if not args.no_peer and args.mode == "lora":
        script = "train_text_to_image_lora_sdxl.py" if is_xl(args) else "train_text_to_image_lora.py"
        rows.append(dict(name=f"diffusers' {script} (peer)", **spawn(args, "peer", keys="{}")))
        print(rows[-1], flush=True)
    keys = {}
    levers = {(False, False): LEVERS, (False, True): SHORT, (True, False): LEVERS_XL, (True, True): SHORT_XL}
    levers = FULL if args.mode == "full" else levers[is_xl(args), args.short]
    for name, lever in levers:
        keys = {**(keys if args.mode == "lora" else {}), **lever, **json.loads(args.keys)}
        rows.append(dict(name=name, keys=dict(keys), **spawn(args, "ours", keys=json.dumps(keys))))
        print(rows[-1], flush=True)
    return rows


def report(args, rows: list[dict]) -> None:
    print(f"\n{args.model} {args.mode} at {args.px} px, batch 1, precision {args.precision}, "
          f"{args.warmup} + {args.steps} steps, {args.threads} thread(s)\n")  # fmt: skip
    print(
        "| row | step peak MB | weights | gradients | optimizer | activations | s/step | vs peer: peak, s |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    peer = rows[0] if rows and rows[0]["name"].endswith("(peer)") and "failed" not in rows[0] else None
    for r in rows:
        if "failed" in r:
            print(f"| {r['name']} | failed: {r['failed']} |||||||")
            continue
        vs = ""
        if peer:
            vs = f"{r['step_peak'] / peer['step_peak']:.2f}x, {r['s_per_step'] / peer['s_per_step']:.2f}x"
        print(f"| {r['name']} | {r['step_peak']:.0f} | {r['weights']:.0f} | {r['gradients']:.0f} | "
              f"{r['optimizer']:.0f} | {r['activations']:.0f} | {r['s_per_step']:.1f} | {vs} |")  # fmt: skip


def count_full(models: list[str]) -> None:
    """A full fine-tune's weights, gradients and optimizer state from each U-Net's parameter count."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdlite.presets import get_preset

    print("| U-Net | parameters | fp32 weights + gradients | + AdamW (2 fp32 moments) | + 8-bit AdamW |")
    print("|---|---|---|---|---|")
    for name in models:
        with torch.device("meta"):
            n = sum(p.numel() for p in UNet2DConditionModel(**get_preset(name).config("unet")).parameters())
        gb = n / 1e9
        print(f"| {name} | {n / 1e6:,.0f} M | {8 * gb:.1f} GB | {16 * gb:.1f} GB | {10 * gb:.1f} GB |")


def attention_memory(tokens: int, width: int, heads: int) -> None:
    """Forward and backward of one self-attention at ``tokens`` (sd15 at 512 px: 4096 tokens of 320
    channels, 8 heads), with the SDPA kernel torch picks (what diffusers' attention calls) and with
    its math backend (the (tokens x tokens) weights kept for the backward): the step's extra peak."""
    import torch
    from diffusers.models.attention_processor import Attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attention = Attention(width, heads=heads, dim_head=width // heads)
    x = torch.randn(1, tokens, width, requires_grad=True)
    print("| SDPA | peak above the inputs, MB | s |\n|---|---|---|")
    kernels = {"torch's choice (fused)": contextlib.nullcontext(), "math": sdpa_kernel(SDPBackend.MATH)}
    for name, kernel in kernels.items():
        before, start = start_peak(x.device), time.perf_counter()
        with kernel:
            attention(x).square().mean().backward()
        print(f"| {name} | {peak(x.device) - before:.0f} | {time.perf_counter() - start:.2f} |")
        x.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", help="sd15 or sdxl (tiny, tiny-sdxl: a smoke run)")
    parser.add_argument("--mode", default="lora", choices=["lora", "full"])
    parser.add_argument("--px", type=int, default=None, help="image side; default the preset's (512, 1024)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--keys", default="{}", help="JSON keys for every row: '{\"use_8bit_adam\": true}'")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: 1 on a CPU, all on a GPU")
    parser.add_argument("--no-peer", action="store_true", help="our rows only")
    parser.add_argument("--short", action="store_true", help="LoRA: the levers in fewer rows")
    parser.add_argument("--images", type=int, default=4, help="images in the data (each cached in 2 flips)")
    parser.add_argument("--count", action="store_true", help="only count the full fine-tunes' parts")
    parser.add_argument("--attention", action="store_true", help="only one attention's memory by SDPA kernel")
    for hidden in ("child", "work"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count:
        return count_full(["sd15", "sdxl"])
    if args.attention:
        return attention_memory(tokens=4096, width=320, heads=8)
    from sdlite.presets import get_preset

    args.px = args.px or get_preset(args.model).resolution
    args.threads = args.threads or (1 if args.device == "cpu" else os.cpu_count())
    if args.child:
        return child(args)
    args.work = tempfile.mkdtemp(prefix="bench_memory_")
    try:
        rows = measure(args)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    report(args, rows)


if __name__ == "__main__":
    main()
