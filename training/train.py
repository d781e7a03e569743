"""Train the latent U-Net of a text-to-image model: Algorithm 1 of Ho et al. 2020 on VAE latents.

    accelerate launch training/train.py --config configs/tiny-shapes.yaml [--key value ...]
    python training/train.py --preset tiny --train_data_dir data/shapes/train --max_steps 100

One optimizer step (Ho et al. 2020, Algorithm 1, in the latent space of Rombach et al. 2022):
    x_0 = scaling_factor * z,  z ~ q(z | image)       VAE encoder; cached on disk as mean and std
    t ~ Uniform{0, ..., T-1},  ε ~ N(0, I)
    x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε                        eq. 4 (scheduler.add_noise)
    loss = w(t) ‖ε - ε_θ(x_t, t, c)‖²                   eq. 14, the simplified objective (w = 1)
With v-prediction the target is v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022); min-SNR-γ
(Hang et al. 2023) sets w(t) = min(SNR(t), γ) / SNR(t) for ε and min(SNR(t), γ) / (SNR(t) + 1) for v.

Outputs under output_dir: config.yaml, checkpoint-N/ (resumable with --resume latest), logs/
(TensorBoard), validation/step-N.png; and final_dir (default output_dir/final), a diffusers-layout
folder whose unet (and text_encoder, when trained) hold the EMA weights (the raw ones are in unet_raw/).

With --lora true the same loop trains LoRA adapters (Hu et al. 2021, sdlite/lora.py) on a frozen base
instead: W' = W + (alpha / r) B A on the U-Net's attention projections (and the text encoder's when
lora_text_encoder), the base in the mixed-precision dtype, the adapters in fp32, no EMA. Checkpoints
then hold only the adapters, and final_dir holds pytorch_lora_weights.safetensors, which
``pipe.load_lora_weights(final_dir)`` reads (sdlite's pipeline or diffusers').
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script (accelerate launch training/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlite.lora import (  # noqa: E402
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    AdapterWeights,
    lora_param_groups,
)
from sdlite.training.checkpoint import (  # noqa: E402
    NonFiniteLossError,
    StopSignals,
    checkpoints,
    find_resume,
    load_checkpoint,
    save_checkpoint,
)
from sdlite.training.config import parse_config, save_yaml, to_dict  # noqa: E402
from sdlite.training.loop import (  # noqa: E402
    EMA,
    Metrics,
    StepSampler,
    make_lr_schedule,
    make_optimizer,
    progress_bar,
    setup_accelerator,
)
from sdlite.training.parts import attach_lora, build_examples, load_parts  # noqa: E402
from sdlite.training.unet_step import Denoiser, optimizer_step, save_final, validate  # noqa: E402


@dataclass
class TrainConfig:
    """Train the latent U-Net (and optionally the text encoder) of a text-to-image model."""

    # The model: a preset from scratch, or a pretrained diffusers-layout folder.
    preset: str = "tiny"  # sdlite.presets name, random init (used when pretrained is None)
    pretrained: str | None = None  # a diffusers-layout folder to fine-tune
    vae_path: str | None = None  # an AutoencoderKL folder (train_vae.py's output_dir/vae) replacing the VAE
    train_text_encoder: bool = False  # train the CLIP text encoder with the U-Net (embeddings not cached)
    prediction_type: str | None = None  # "epsilon" or "v_prediction"; None: the scheduler's
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023); also sets trailing spacing
    # Data: an image folder with metadata.jsonl, a save_to_disk folder, or a CSV/parquet/JSON-lines file.
    train_data_dir: str = "data/shapes/train"
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int | None = None  # None: the VAE's sample_size
    random_crop: bool = False  # one random square per image (from seed and index); else centre crop
    random_flip: bool = False  # flip left-right with probability 1/2 (both flips are cached)
    caption_dropout: float = 0.0  # probability of the empty caption, for classifier-free guidance
    cache_latents: bool = True  # encode each image once, keep mean and std of q(z|x) on disk
    cache_text: bool = True  # cache the text embeddings too (only while the text encoder is frozen)
    cache_dir: str = "~/.cache/sdlite"
    dataloader_num_workers: int = 0
    streaming: bool = False  # stream train_data_dir's shards, nothing cached (sdlite/data/streaming.py)
    shuffle_buffer: int = 1000  # streaming: rows held for shuffling (more: a better shuffle, more memory)
    # Optimisation: steps are optimizer steps; the global batch is batch x processes x accumulation.
    seed: int = 0
    max_steps: int = 1000
    train_batch_size: int = 32  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # any diffusers.optimization schedule, in optimizer steps
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit
    max_grad_norm: float = 1.0  # 0: no clipping
    snr_gamma: float | None = None  # min-SNR-γ loss weights; 5 is the paper's
    noise_offset: float = 0.0  # ε += offset * N(0, I) per (sample, channel) (Guttenberg 2023)
    ema_decay: float | None = 0.9999  # None: no EMA
    # Speed
    mixed_precision: str | None = None  # "no", "fp16", "bf16"; None: accelerate's config decides
    allow_tf32: bool = True
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the U-Net
    channels_last: bool = False
    # Validation, logging, checkpoints
    output_dir: str = "runs/train"
    final_dir: str | None = None  # None: output_dir/final
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0  # steps; 0: only at the end
    validation_inference_steps: int = 50
    validation_guidance: float = 7.5
    val_data_dir: str | None = None  # held-out data for the validation loss (same formats as train)
    val_count: int = 64  # held-out items used
    val_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    log_every: int = 50
    report_to: str | None = "tensorboard"
    checkpoint_every: int = 500  # steps; 0: none
    checkpoints_total_limit: int | None = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    # LoRA: train low-rank adapters on the frozen model instead of its weights (learning_rate is the
    # U-Net adapter's). The update is (lora_alpha / lora_rank) B A; alpha None means alpha = rank.
    lora: bool = False
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(UNET_TARGETS))  # U-Net attention
    lora_text_encoder: bool = False  # an adapter on the text encoder too (embeddings are then not cached)
    lora_text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    text_encoder_lr: float | None = None  # the text encoder adapter's learning rate; None: learning_rate
    # Faults (docs/reliability.md)
    bad_data: str = "skip"  # unreadable images: "skip" them (listed in output_dir/bad_files.txt) or "error"
    nonfinite_loss: str = "skip"  # a NaN/inf loss or gradient: "skip" the step, or "stop" the run

    @property
    def text_encoder_trains(self) -> bool:
        """Whether gradients reach the text encoder: trained whole, or through its LoRA adapter."""
        return self.train_text_encoder or (self.lora and self.lora_text_encoder)


def check_config(cfg: TrainConfig) -> None:
    problems = []
    if cfg.prediction_type not in (None, "epsilon", "v_prediction"):
        problems.append(f"prediction_type={cfg.prediction_type!r}: use epsilon or v_prediction")
    if cfg.mixed_precision not in (None, "no", "fp16", "bf16"):
        problems.append(f"mixed_precision={cfg.mixed_precision!r}: use no, fp16 or bf16")
    if not 0 <= cfg.caption_dropout < 1:
        problems.append(f"caption_dropout={cfg.caption_dropout} must be in [0, 1)")
    if min(cfg.max_steps, cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.log_every) < 1:
        problems.append("max_steps, train_batch_size, gradient_accumulation_steps and log_every must be >= 1")
    if cfg.lora and cfg.train_text_encoder:
        problems.append("lora with train_text_encoder: LoRA trains no base weight; use lora_text_encoder")
    if cfg.lora and (cfg.lora_rank < 1 or not 0 <= cfg.lora_dropout < 1):
        problems.append(f"lora_rank {cfg.lora_rank} must be >= 1, lora_dropout {cfg.lora_dropout} in [0, 1)")
    if cfg.bad_data not in ("skip", "error"):
        problems.append(f"bad_data={cfg.bad_data!r}: use skip or error")
    if cfg.nonfinite_loss not in ("skip", "stop"):
        problems.append(f"nonfinite_loss={cfg.nonfinite_loss!r}: use skip or stop")
    if problems:
        raise ValueError("bad training config: " + "; ".join(problems))


@dataclass
class Run:
    """Everything a running training holds; the step functions take it."""

    cfg: TrainConfig
    accelerator: object
    parts: object  # sdlite.models.Components (unwrapped)
    model: torch.nn.Module  # the prepared Denoiser (DDP-wrapped with several processes)
    params: list  # its trained parameters
    optimizer: object
    lr_schedule: object
    ema: EMA | None  # on the main process only
    sampler: StepSampler
    batches: object  # iterator over the DataLoader
    empty_text: torch.Tensor  # the empty caption's embeddings (1, L, D) or token ids (1, L)
    latent_shape: tuple[int, int, int]
    val: dict | None  # held-out batch and its fixed draws
    start_step: int


def setup(cfg: TrainConfig) -> Run:
    """Build the models, cache the data, prepare with accelerate and resume: ready for step ``start_step``."""
    check_config(cfg)
    acc = setup_accelerator(
        cfg.output_dir, cfg.mixed_precision, cfg.gradient_accumulation_steps, cfg.report_to, cfg.allow_tf32
    )
    parts = load_parts(cfg, acc.device)
    examples, empty_text, latent_shape, val = build_examples(cfg, acc, parts)
    if cfg.lora:  # after build_examples: the cache is filled by the fp32 models, as without LoRA
        attach_lora(cfg, parts, acc)

    unet, text_encoder = parts.unet, parts.text_encoder if cfg.text_encoder_trains else None
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if text_encoder is not None:
            text_encoder.gradient_checkpointing_enable()
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        unet.compile()
    denoiser = Denoiser(unet, text_encoder, channels_last=cfg.channels_last).train()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.lora:  # the text encoder's adapter at its own rate
        groups = lora_param_groups(parts.unet, text_encoder, cfg.learning_rate, cfg.text_encoder_lr)
    else:
        groups = params
    optimizer = make_optimizer(groups, cfg.learning_rate, betas, cfg.adam_weight_decay, cfg.adam_epsilon,
                               use_8bit=cfg.use_8bit_adam)  # fmt: skip
    lr_schedule = make_lr_schedule(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_steps)
    model, optimizer = acc.prepare(denoiser, optimizer)  # not the schedule: see make_lr_schedule
    use_ema = cfg.ema_decay and not cfg.lora  # LoRA: the adapter as trained, as diffusers' LoRA script
    ema = EMA(params, cfg.ema_decay) if use_ema and acc.is_main_process else None

    start_step, checkpoint = 0, find_resume(cfg.output_dir, cfg.resume)
    if checkpoint is not None:
        start_step = load_checkpoint(
            acc, checkpoint, trained_modules(parts, cfg), optimizer, lr_schedule, ema
        )["step"]
        acc.print(f"resumed from {checkpoint} at step {start_step}")
    elif checkpoints(cfg.output_dir):
        acc.print(f"warning: {cfg.output_dir} holds checkpoints of an earlier run; this run starts at step 0 "
                  "(--resume latest continues the earlier one)")  # fmt: skip
    workers = cfg.dataloader_num_workers
    if cfg.streaming:  # sdlite.data.streaming: the stream is its own sampler; a resume skips what was read
        sampler, loader = examples, examples.loader(start_step, workers, acc.device.type == "cuda")
    else:
        sampler = StepSampler(len(examples), cfg.train_batch_size, cfg.seed, cfg.max_steps, start_step,
                              acc.num_processes, acc.process_index, cfg.gradient_accumulation_steps,
                              random_flip=cfg.random_flip)  # fmt: skip
        loader = torch.utils.data.DataLoader(
            examples, batch_sampler=sampler, num_workers=workers, prefetch_factor=4 if workers else None,
            pin_memory=acc.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global RNG alone: exact resume
        )  # fmt: skip
    if acc.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, Path(cfg.output_dir) / "config.yaml")
        hparams = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in to_dict(cfg).items()
        }
        acc.init_trackers("sdlite-train", config=hparams)
    return Run(cfg=cfg, accelerator=acc, parts=parts, model=model, params=params, optimizer=optimizer,
               lr_schedule=lr_schedule, ema=ema, sampler=sampler, batches=iter(loader), empty_text=empty_text,
               latent_shape=latent_shape, val=val, start_step=start_step)  # fmt: skip


def trained_modules(parts, cfg: TrainConfig) -> dict[str, torch.nn.Module]:
    """What a checkpoint holds of the model: the trained models, or with LoRA only their adapters."""
    if cfg.lora:
        te = {"text_encoder_lora": AdapterWeights(parts.text_encoder)} if cfg.lora_text_encoder else {}
        return {"unet_lora": AdapterWeights(parts.unet), **te}
    return {"unet": parts.unet, **({"text_encoder": parts.text_encoder} if cfg.train_text_encoder else {})}


def train(cfg: TrainConfig) -> Path:
    """Train from step 0 or the resumed checkpoint to max_steps; returns the final model folder.

    Faults (docs/reliability.md): a step whose loss or gradients are NaN or inf changes nothing
    (optimizer_step); the loop counts such steps at its host-sync points (log and checkpoint steps)
    and warns, or with nonfinite_loss=stop raises there, before any checkpoint of that window is
    written. SIGTERM or SIGINT: a checkpoint after the current step, then exit 128 + the signal.
    """
    run = setup(cfg)
    acc = run.accelerator
    global_batch, items = run.sampler.global_batch, run.sampler.num_items or "streamed"
    acc.print(
        f"training {sum(p.numel() for p in run.params) / 1e6:.2f} M parameters on {items} "
        f"examples, global batch {global_batch}, steps {run.start_step} -> {cfg.max_steps}"
    )
    metrics = Metrics(acc, images_per_step=global_batch)
    bar = progress_bar(acc, cfg.max_steps, run.start_step)
    nonfinite, since = torch.zeros((), device=acc.device), run.start_step  # skipped steps since `since`
    with StopSignals() as stop, contextlib.closing(bar):
        for step in range(run.start_step, cfg.max_steps):
            loss, skipped = optimizer_step(run, step)
            metrics.add(loss=loss)
            nonfinite += skipped
            done = step + 1
            bar.update(1)
            logging = done % cfg.log_every == 0 or done == cfg.max_steps
            # A checkpoint every checkpoint_every steps and at the end, so that a finished run can go on.
            saving = cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.max_steps)
            if logging or saving:  # the loop's only host syncs
                check_nonfinite(cfg, acc, int(acc.reduce(nonfinite, "max").item()), since, done)
                nonfinite.zero_()
                since = done
            if logging:
                logs = metrics.report(done, lr=run.lr_schedule.get_last_lr()[0])
                bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_second']:.1f}")
            if saving:
                save_checkpoint(acc, cfg.output_dir, done, trained_modules(run.parts, cfg), run.optimizer,
                                run.lr_schedule, run.ema, cfg.checkpoints_total_limit)  # fmt: skip
            signum = stop.requested(acc, synced=bool(logging or saving))
            if signum:  # SIGTERM, Ctrl-C: keep this step's state and go
                if not saving:
                    save_checkpoint(acc, cfg.output_dir, done, trained_modules(run.parts, cfg), run.optimizer,
                                    run.lr_schedule, run.ema, cfg.checkpoints_total_limit)  # fmt: skip
                acc.print(f"{signal.Signals(signum).name}: stopped after step {done} with checkpoint-{done} "
                          "in output_dir; continue with --resume latest")  # fmt: skip
                acc.end_training()
                raise SystemExit(128 + signum)
            if cfg.validation_every and done % cfg.validation_every == 0 and done < cfg.max_steps:
                validate(run, done)
    validate(run, cfg.max_steps)
    final = save_final(run)
    acc.end_training()
    return final


def check_nonfinite(cfg: TrainConfig, acc, count: int, since: int, done: int) -> None:
    """Report the steps since..done whose loss or gradients were NaN or inf (each skipped)."""
    if not count:
        return
    steps = f"step {done}" if done - since == 1 else f"steps {since + 1}..{done}"
    what = f"{count} step(s) of {steps} had a NaN or inf loss or gradients"
    if cfg.nonfinite_loss == "stop":
        last = checkpoints(cfg.output_dir)
        raise NonFiniteLossError(
            f"{what} (nonfinite_loss=stop); they were skipped, so the weights are finite, and no checkpoint "
            f"was written after them; the last one is {str(last[-1]) if last else 'none'}. Try a lower "
            "learning_rate, bf16 instead of fp16 or max_grad_norm > 0; nonfinite_loss=skip trains past them"
        )
    acc.print(f"warning: {what}; those steps were skipped (weights unchanged)")


def main(argv: list[str] | None = None) -> Path:
    return train(parse_config(TrainConfig, argv))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
