"""Train the latent U-Net of a text-to-image model: Algorithm 1 of Ho et al. 2020 on VAE latents.

    accelerate launch training/train.py --config configs/tiny-shapes.yaml [--key value ...]
    python training/train.py --preset tiny --train_data_dir data/shapes/train --max_steps 100

One optimizer step (Ho et al. 2020, Algorithm 1, in the latent space of Rombach et al. 2022):
    x_0 = scaling_factor * (z - shift),  z ~ q(z|x)   VAE encoder (mean, std cached); sdlite/latents.py
    t ~ Uniform{0, ..., T-1},  ε ~ N(0, I)
    x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε                        eq. 4 (scheduler.add_noise)
    loss = w(t) ‖ε - ε_θ(x_t, t, c)‖²                   eq. 14, the simplified objective (w = 1)
With v-prediction the target is v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022); min-SNR-γ
(Hang et al. 2023) sets w(t) = min(SNR(t), γ) / SNR(t) for ε and min(SNR(t), γ) / (SNR(t) + 1) for v.

Outputs under output_dir: config.yaml, checkpoint-N/ (resumable with --resume latest), logs/ (TensorBoard),
validation/step-N.png (and step-N/NN.png, one per sample prompt), run.lock (one run at a time), buckets.json
(with aspect_buckets: "WxH" -> images); and final_dir (default output_dir/final), a diffusers-layout folder
whose unet (and text_encoder, when trained) hold the EMA weights (the raw ones are in unet_raw/). final_dir is
replaced only if this run published it: a folder of other files is refused at start-up.

Photo sets (training/examples.py): caption folders with repeat folders, aspect-ratio buckets, captions
drawn per step, and DreamBooth (Ruiz et al. 2023; loss = mean_subject + λ mean_class, eq. 2). Adapters
in place of the weights: --lora true (Hu et al. 2021; LoHa, LoKr, DoRA by lora_type and lora_dora;
sdlite/lora.py), a new word's vectors (--textual_inversion_token, training/textual_inversion.py), or an
LCM-LoRA distilled from the model (--distill lcm, training/lcm_step.py). An inpainting U-Net
(--inpainting true, training/inpaint_step.py) reads random masks and the masked image beside x_t.
SDXL (Podell et al. 2023) runs in the same loop through its family (training/family_sdxl.py).
docs/training.md says what each writes.

``UNetTrainer`` is the run: its ``__init__`` builds everything (the model through its family,
training/family.py; the data from training/examples.py; the step's math from training/unet_step.py),
``train`` runs the loop it shares with the VAE trainer (training/trainer.py), then validates and saves.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch training/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # an entry point: third-party noise dropped before diffusers is imported, and
    # the command line read before torch is, so that --help and a wrong flag answer at once
    from training.config.keys import parse_config as _parse_config
    from training.config.unet import TrainConfig as _Config
    from training.errors import reported_errors as _reported_errors
    from training.quiet import quiet_third_party

    quiet_third_party()
    with _reported_errors("train.py"):
        COMMAND_LINE = _parse_config(_Config)

import torch  # noqa: E402

from sdlite.data.dreambooth import prior_preservation_loss  # noqa: E402
from sdlite.lora import AdapterWeights, lora_param_groups, target_problems  # noqa: E402
from training.accelerator import setup_accelerator  # noqa: E402
from training.closing import closing_message  # noqa: E402
from training.config.keys import parse_config  # noqa: E402
from training.config.unet import TrainConfig  # noqa: E402
from training.errors import reported_errors  # noqa: E402
from training.examples import training_data  # noqa: E402
from training.families import family_of  # noqa: E402
from training.family import lora_settings, weight_dtype  # noqa: E402
from training.final_folder import write_final  # noqa: E402
from training.inpaint_step import Inpainting  # noqa: E402
from training.launch import follow_launcher  # noqa: E402
from training.lcm_step import ConsistencyDistillation, written_before_the_target  # noqa: E402
from training.optim import EMA, make_lr_schedule, make_optimizer  # noqa: E402
from training.sharding import (  # noqa: E402
    ShardedEMA,
    gathered,
    held,
    launch_sharding,
    shard_model,
    sharding_refusals,
)
from training.textual_inversion import attach_word, word_checkpoint  # noqa: E402
from training.trainer import Trainer, leave  # noqa: E402
from training.unet_step import diffusion_loss, draw_step, latents_of  # noqa: E402
from training.validation import UNetValidation  # noqa: E402


class UNetTrainer(UNetValidation, Trainer):
    """A U-Net training run: ``UNetTrainer(cfg).train()`` builds, resumes, trains, saves final_dir."""

    cfg: TrainConfig

    def make_accelerator(self):
        c = self.cfg
        acc = setup_accelerator(
            c.run.output_dir,
            c.optimizer.mixed_precision,
            c.optimizer.gradient_accumulation_steps,
            c.run.report_to,
            c.run.allow_tf32,
            shards=True,
        )
        self.sharding = launch_sharding() if acc.num_processes > 1 else None  # one process: nothing to shard
        problems = sharding_refusals(c, acc.mixed_precision) if self.sharding else []
        if problems:
            raise ValueError("under FSDP: " + "; ".join(problems))
        return acc

    def final_path(self) -> str | None:
        return self.cfg.run.final_dir

    def setup(self) -> None:
        """Build the models, cache the data, prepare with accelerate and resume: ready for ``start_step``."""
        cfg, acc = self.cfg, self.accelerator
        distill = cfg.distillation
        if distill.lcm and (older := written_before_the_target(cfg.run.output_dir, cfg.run.resume,
                                                               distill.lcm_target_decay)):  # fmt: skip
            raise ValueError(older)  # before the model is read
        self.family = family = self.load_model()
        self.parts = family.parts  # unwrapped
        # inpainting: a 4-channel U-Net widened to read the mask and masked image (training/inpaint_step.py)
        self.inpainter = (
            Inpainting(cfg.inpaint, cfg.optimizer.seed, family) if cfg.inpaint.inpainting else None
        )
        # Textual inversion: the new word in the tokenizers before any caption is tokenized
        self.words = attach_word(family, cfg.inversion) if cfg.inverts else {}
        # training/examples.py; DreamBooth's class images are generated there, before any adapter attaches
        self.data = data = training_data(cfg, acc, family)
        self.sampler, self.layout, self.val = data.sampler, data.layout, data.held_out
        if cfg.adapters.lora:  # after training_data: the cache is filled by the fp32 models, as without LoRA
            seed, dtype = cfg.optimizer.seed, weight_dtype(acc.mixed_precision)
            family.attach_lora(lora_settings(cfg.adapters), seed, dtype, acc.device)
            if cfg.adapters.lora_base_dtype:
                family.store_base_weights(cfg.adapters.lora_base_dtype)
        family.freeze_unread()
        if cfg.data.release_encoders:  # the cache holds every example: docs/training.md, Fitting a card
            family.release_encoders()
        denoiser, groups = self.make_denoiser()
        self.distiller = self.make_distiller(denoiser)  # before resume: a full-weight teacher is copied
        opt = cfg.optimizer
        betas = (opt.adam_beta1, opt.adam_beta2)
        optimizer = make_optimizer(groups, opt.learning_rate, betas, opt.adam_weight_decay, opt.adam_epsilon,
                                   use_8bit=opt.use_8bit_adam, kernel=opt.optimizer_kernel)  # fmt: skip
        self.lr_schedule = make_lr_schedule(optimizer, opt.lr_scheduler, opt.lr_warmup_steps, opt.max_steps)
        # The model is the prepared Denoiser (DDP-wrapped with several processes; sharded, as it is); not
        # the schedule: see make_lr_schedule.
        if self.sharding:
            self.model, self.optimizer = denoiser, acc.prepare(optimizer)
            # under autocast, as prepare runs the models it wraps: diffusers casts some inputs to its
            # parameters' dtype, which FSDP's bf16 policy leaves fp32 (only the gathered copies are bf16)
            denoiser.forward = acc.autocast()(denoiser.forward)
        else:
            self.model, self.optimizer = acc.prepare(denoiser, optimizer)
        if self.distiller is not None:
            self.distiller.start_target(self.params)  # before resume, which loads it
        use_ema = opt.ema_decay and not cfg.adapters.lora and not cfg.inverts  # as trained, as diffusers'
        self.ema = None
        if use_ema and self.sharding:  # every process averages its own shards
            self.ema = ShardedEMA(denoiser, self.params, opt.ema_decay)
        elif use_ema and acc.is_main_process:
            self.ema = EMA(self.params, opt.ema_decay)
        self.start_step = self.resume()
        workers, pin = cfg.data.dataloader_num_workers, acc.device.type == "cuda"
        self.batches = iter(data.loader(self.start_step, workers, pin, opt.seed))
        self.global_batch, self.eval_every = self.sampler.global_batch, cfg.validation.validation_every
        self.start_logs()

    def load_model(self):
        """The run's model family (training/families.py: SD 1.x/2.x or SDXL) with its model loaded; what
        the family or the LoRA targets cannot take fails first, before any weight or image is read."""
        cfg, acc = self.cfg, self.accelerator
        family = family_of(cfg.model)
        problems = family.refusals(cfg)
        if problems:
            raise ValueError(f"bad training config for {family.name}: " + "; ".join(problems))
        family = family.load(cfg.model, cfg.optimizer.seed, acc.device, cfg.inpaint.inpainting)
        lora = cfg.adapters
        problems = (
            target_problems(lora_settings(lora), family.parts.unet, family.encoders) if lora.lora else []
        )
        if problems:  # before the class images and the caches, which peft's own error would come after
            raise ValueError(
                "bad LoRA targets for this model: " + "; ".join(problems) + ". Name modules it has "
                "(lora_target_modules, lora_text_encoder_target_modules), or set lora_text_encoder false "
                "to adapt the U-Net alone (a text encoder of 0 layers has no attention for an adapter)"
            )
        return family

    def make_denoiser(self) -> tuple[torch.nn.Module, list[dict]]:
        """ε_θ with the trained text encoders in front, its speed options applied, and the optimizer's
        parameter groups (one per model, so that each one's rate is logged as lr/<name>); sets ``params``."""
        cfg, run, unet = self.cfg, self.cfg.run, self.parts.unet
        encoders = list(self.family.encoders.values()) if cfg.text_encoder_trains else []  # SDXL: two
        if run.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            for text_encoder in encoders:
                text_encoder.gradient_checkpointing_enable()
        if run.channels_last:
            unet.to(memory_format=torch.channels_last)
        if run.compile:
            unet.compile()
        denoiser = self.family.denoiser(encoders, run.channels_last)
        if self.sharding:  # before the parameters are listed: sharding replaces them with DTensors
            shard_model(denoiser, self.sharding, self.accelerator.mixed_precision, self.accelerator.device)
        denoiser.train()
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        if cfg.adapters.lora:  # the text encoders' adapters at their own rate
            te, te_2 = (encoders + [None, None])[:2]  # none trained, SD's one or SDXL's two
            lrs = cfg.optimizer.learning_rate, cfg.adapters.text_encoder_lr
            groups = lora_param_groups(unet, te, *lrs, text_encoder_2=te_2)
        elif cfg.inverts:  # the word's vectors alone, at learning_rate
            groups = [{"params": [w.vectors for w in self.words.values()]}]
        else:
            groups = [{"params": [p for p in m.parameters() if p.requires_grad]} for m in (unet, *encoders)]
        names = ("text_encoder",) if cfg.inverts else ("unet", "text_encoder", "text_encoder_2")
        for group, name in zip(groups, names):  # as both make them
            group["name"] = name
        return denoiser, groups

    def make_distiller(self, denoiser) -> ConsistencyDistillation | None:
        """With ``distill: lcm`` the step's consistency loss (training/lcm_step.py), its teacher the model
        as loaded; else None (Algorithm 1)."""
        cfg, family = self.cfg, self.family
        if not cfg.distillation.lcm:
            return None
        zeros = family.pipeline_options().get("force_zeros_for_empty_prompt", False)
        return ConsistencyDistillation(
            cfg.distillation, self.parts.scheduler, denoiser, cfg.adapters.lora, zeros
        )

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        """What a checkpoint holds of the model: the trained models, or with LoRA only their adapters; and
        a distillation's target network θ⁻."""
        target = self.distiller.target if self.distiller is not None else None
        return self.trained_modules() | ({"lcm_target": target} if target is not None else {})

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        parts, cfg = self.parts, self.cfg
        encoders = self.family.encoders.items()  # text_encoder, and SDXL's text_encoder_2
        if cfg.inverts:
            return {"word": word_checkpoint(self.words)}
        if cfg.adapters.lora:
            te = (
                {f"{n}_lora": AdapterWeights(m) for n, m in encoders}
                if cfg.adapters.lora_text_encoder
                else {}
            )
            return {"unet_lora": AdapterWeights(parts.unet), **te}
        if self.sharding:  # every trained model is in the sharded Denoiser, saved as one (DCP)
            return {"model": self.model}
        te = dict(encoders) if cfg.model.train_text_encoder else {}
        return {"unet": parts.unet, **te}

    def train(self) -> Path:
        """Train from step start_step to max_steps, validate, save; returns the final model folder."""
        cfg, acc = self.cfg, self.accelerator
        try:
            acc.print(
                f"training {sum(p.numel() for p in self.params) / 1e6:.2f} M parameters on "
                f"{self.sampler.num_items or 'streamed'} examples, global batch {self.global_batch}, "
                f"steps {self.start_step} -> {cfg.optimizer.max_steps}"
            )
            if self.sharding:
                mine, whole = held(self.params)
                print(f"FSDP ({self.sharding.style} style): process {acc.process_index} holds "
                      f"{mine / 1e6:.2f} M of the {whole / 1e6:.2f} M trained parameters")  # fmt: skip
            self.loop()
            self.evaluate(cfg.optimizer.max_steps)
            final = self.save_final()
            acc.end_training()
            return final
        finally:
            self.release()

    # ---- one step -------------------------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.optimizer_step(step)

    def optimizer_step(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step over gradient_accumulation_steps micro-batches: ({"loss": mean loss, with
        DreamBooth's prior preservation also "instance_loss", "prior_loss"}, non-finite flag), all on the
        device. A step whose loss or gradients are NaN or inf changes nothing."""
        cfg, acc, parts = self.cfg, self.accelerator, self.parts
        T = parts.scheduler.config.num_train_timesteps
        opt = cfg.optimizer
        draws = draw_step(opt.seed, cfg.data.caption_dropout, opt.noise_offset, step, self.global_batch, T,
                          self.data.step_latent_shape(step), acc.device)  # fmt: skip
        if self.distiller is not None:
            draws |= self.distiller.draw(opt.seed, step, self.global_batch, acc.device)
        if self.inpainter is not None:
            draws |= self.inpainter.draw(
                step, self.global_batch, self.data.step_latent_shape(step), acc.device
            )
        total = torch.zeros((), device=acc.device)
        halves = torch.zeros(2, device=acc.device)  # DreamBooth: the instance and prior losses' sums
        nonfinite = torch.zeros((), dtype=torch.bool, device=acc.device)
        for micro in range(cfg.optimizer.gradient_accumulation_steps):
            batch = next(self.batches)
            # DreamBooth's batches say which of their items are class images; the mask stays on the CPU:
            # read there, no wait for the device
            is_prior = batch.pop("is_prior", None)
            prior_pairs = is_prior is not None
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            # DreamBooth's sampler interleaves its halves by micro-batch: its draws have their own places
            where = self.sampler.draw_positions(micro)
            mine = {k: v[where] for k, v in draws.items()}
            with acc.accumulate(self.model):
                with acc.autocast():
                    x0 = latents_of(batch, parts.vae, mine["latent_noise"])
                    text = self.text_condition(batch, mine["drop"])
                    extra = self.inpainter.inputs(batch, mine) if self.inpainter is not None else None
                    if self.distiller is not None:  # the teacher's unconditional half: the empty caption
                        blank = self.text_condition(batch, torch.ones_like(mine["drop"]))
                if self.distiller is not None:
                    loss = self.distiller.loss(self.model, x0, text, blank, mine)
                else:
                    loss = diffusion_loss(
                        self.model,
                        parts.scheduler,
                        x0,
                        text,
                        mine["t"],
                        mine["noise"],
                        cfg.optimizer.snr_gamma,
                        per_example=prior_pairs,  # DreamBooth's two halves are weighed apart
                        extra=extra,
                    )
                if prior_pairs:  # Ruiz et al. eq. 2: instance mean + λ class mean
                    loss, instance, prior = prior_preservation_loss(
                        loss, is_prior, cfg.dreambooth.prior_loss_weight
                    )
                    halves += torch.stack([instance, prior]).detach()
                acc.backward(loss)
                total += loss.detach()
                if acc.sync_gradients:
                    nonfinite = self.update(~torch.isfinite(total))
        if self.ema is not None:
            self.ema.update(self.params)
        if self.distiller is not None:
            self.distiller.update_target()
        logs = {"loss": total / cfg.optimizer.gradient_accumulation_steps}
        if prior_pairs:
            logs["instance_loss"], logs["prior_loss"] = halves / cfg.optimizer.gradient_accumulation_steps
        return logs, nonfinite

    def text_condition(self, batch: dict, drop: torch.Tensor):
        """c of a batch in the family's terms, the empty caption where ``drop``; token ids when the text
        encoders train."""
        return self.family.condition(batch, self.data.empty, drop, self.cfg.text_encoder_trains)

    # ---- validation -----------------------------------------------------------------------------------

    def ema_weights(self):
        """Inside the block the trained parameters hold their EMA, when there is one."""
        return self.ema.swapped_into(self.params) if self.ema is not None else contextlib.nullcontext()

    # ---- the result -----------------------------------------------------------------------------------

    def save_final(self) -> Path:
        """The diffusers-layout folder (EMA weights in unet/ and text_encoder/; raw ones in *_raw/), or with
        LoRA pytorch_lora_weights.safetensors (and lora_kohya.safetensors with lora_save_format kohya);
        published atomically in final_dir, with the run's config as train_config.yaml."""
        acc, cfg = self.accelerator, self.cfg
        acc.wait_for_everyone()
        raw = averaged = None
        if self.sharding:  # every process takes part in gathering the whole weights onto the main one
            self.check_finite_weights()
            raw = gathered(self.model)
            with self.ema_weights():
                averaged = gathered(self.model) if self.ema is not None else raw
        if acc.is_main_process:
            with self.publishing() as tmp:
                write_final(self, tmp, raw, averaged)
            distilled, inpainting = self.distiller is not None, self.inpainter is not None
            alphas = self.distiller.schedule.alphas_cumprod if distilled else None
            acc.print(closing_message(cfg, self.final, distilled, inpainting, alphas))
        acc.wait_for_everyone()
        return self.final


def train(cfg: TrainConfig) -> Path:
    """Train from step 0 or the resumed checkpoint to max_steps; returns the final model folder."""
    return UNetTrainer(cfg).train()


def main(argv: list[str] | None = None) -> Path:
    """Parse the flags and train. Errors propagate to the caller; run as a script, training/errors.py
    ends those sdlite raises on purpose with one line (``--debug``: the traceback)."""
    return train(parse_config(TrainConfig, argv))


if __name__ == "__main__":
    follow_launcher()  # one-process accelerate launch: if the launcher dies, checkpoint and stop
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with reported_errors("train.py"):  # one line for an error of ours; --debug: the traceback
        trainer = UNetTrainer(COMMAND_LINE)
        trainer.train()
    leave()  # the trainer still held: its DDP model is never freed (see leave)
