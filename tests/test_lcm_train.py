"""``distill: lcm`` in training/train.py: latent consistency distillation (training/lcm_step.py) in the U-Net
trainer's loop, on tiny models: the LCM-LoRA trains the adapter alone on a teacher that stays the base,
saves as an ordinary LoRA (diffusers' and kohya's files) that gives the same 4-step LCMScheduler image in
diffusers' pipeline as in ours, resumes exactly, distils a full-weight student and SDXL too, and settings
it cannot take fail before anything is read."""

import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file
from test_train import ROOT, flags, launch, run_killed_at, trainers_kept

from pipelines import TextToImagePipeline, TextToImageXLPipeline
from sdlite.cli import main as sdlite
from sdlite.models import build_components, load_components
from sdlite.models_xl import build_components_xl, load_components_xl
from training.checks import ConfigError
from training.cmd_evaluate import run_evaluation
from training.config import parse_config
from training.config.unet import TrainConfig
from training.lcm_step import ConsistencyDistillation, TargetNetwork
from training.schedulers import make_scheduler
from training.train import main

# An adapter on attention and on a convolution (kohya's files hold both), a rate that moves it in 3 steps.
LCM_LORA = dict(distill="lcm", lora="true", lora_rank=4, lora_target_modules="to_q,to_k,to_v,to_out.0,conv1",
                lora_save_format="kohya", learning_rate=1e-2, lcm_w_min=1.0, lcm_w_max=3.0)  # fmt: skip


def run(data, cache, out, **options):
    """training/train.py's main; accelerate's one state per process reset around it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return main(flags(data, cache, out, **options))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The teacher: the tiny preset's model saved as a folder."""
    return build_components("tiny", seed=0).save_pretrained(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def distilled(data, cache, base, tmp_path_factory):
    """A 3-step LCM-LoRA run, and the trainer that ran it."""
    out = tmp_path_factory.mktemp("lcm")
    with trainers_kept() as runs:
        run(data, cache, out, pretrained=base, **LCM_LORA)
    return out, runs[0]


def test_an_lcm_lora_run_trains_the_adapter_alone_and_saves_diffusers_and_kohya_files(distilled, base):
    out, trainer = distilled
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    kohya = load_file(out / "final" / "lora_kohya.safetensors")
    assert any("resnets" in k and "conv1" in k for k in kohya), "the convolution's adapter in kohya's file"
    before = load_components(base).unet.state_dict()
    after = {
        k.replace(".base_layer.", "."): v
        for k, v in trainer.parts.unet.state_dict().items()
        if "lora_" not in k
    }
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    lora_B = [p for n, p in trainer.parts.unet.named_parameters() if "lora_B" in n]
    assert lora_B and all(p.abs().max() > 0 for p in lora_B)


def test_the_target_is_the_students_moving_average_and_leaves_the_student_as_it_was():
    layer = torch.nn.Linear(3, 2)
    weights = list(layer.parameters())
    target = TargetNetwork(weights, 0.9)
    before = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w in weights:
            w.add_(1.0)  # the optimizer's step
    target.update()
    averaged = [0.9 * b + 0.1 * (b + 1.0) for b in before]  # θ⁻ ← μ θ⁻ + (1 - μ) θ, from θ⁻ = θ
    with target.swapped_in():
        assert all(torch.allclose(w, a) for w, a in zip(weights, averaged))
    assert all(torch.equal(w, b + 1.0) for w, b in zip(weights, before))
    saved = target.state_dict()  # what a checkpoint writes
    assert all(torch.allclose(saved[f"average_{i}"], a) for i, a in enumerate(averaged))


def test_a_run_keeps_its_target_trailing_the_adapter(distilled):
    trainer = distilled[1]
    adapter, target = trainer.params, trainer.distiller.target
    assert target is not None and len(target.average.shadow) == len(adapter)
    trailing = [not torch.allclose(t, p) for t, p in zip(target.average.shadow, adapter)]
    assert any(trailing), "θ⁻ is the student itself"


def test_the_teacher_is_the_base_model_and_the_student_the_base_plus_the_adapter(distilled, base):
    _, trainer = distilled
    plain = load_components(base).unet
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([19, 999])
    text = torch.randn(2, 77, plain.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = plain(x, t, encoder_hidden_states=text).sample
        teacher = trainer.distiller.teacher(x, t, text)
        student = trainer.distiller.denoiser(x, t, text)
    assert torch.allclose(teacher, expected, atol=1e-6)
    assert (student - expected).abs().max() > 1e-4, "the adapter is on again after the teacher's pass"


def with_lcm_scheduler(parts):
    """The parts with LCMScheduler of their schedule, steps_offset 1 (diffusers' pipeline rewrites it)."""
    config = {k: v for k, v in parts.scheduler.config.items() if not k.startswith("_")}
    return dataclasses.replace(parts, scheduler=LCMScheduler.from_config(config | {"steps_offset": 1}))


def test_the_lcm_lora_gives_the_same_4_step_image_in_diffusers_as_in_ours(distilled, base):
    final = distilled[0] / "final"
    parts = with_lcm_scheduler(load_components(base))
    ours = TextToImagePipeline(**copy.deepcopy(parts).as_dict())
    theirs = StableDiffusionPipeline(**copy.deepcopy(parts).as_dict(), safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    kw = dict(num_inference_steps=4, guidance_scale=1.0, output_type="np")
    prompts = ["a red circle", "a blue square"]
    ours.set_progress_bar_config(disable=True)
    plain = ours(prompts, generator=torch.Generator().manual_seed(0), **kw).images
    images = []
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(final)
        images.append(pipe(prompts, generator=torch.Generator().manual_seed(0), **kw).images)
    assert np.abs(images[0] - plain).max() > 1e-3, "the adapter changed nothing"
    assert np.abs(images[0] - images[1]).max() <= 1e-4


def test_two_launched_processes_distil_like_one(data, cache, base, tmp_path):
    # Adam turns the float32 sums' order in near-zero gradients into steps as large as the learning rate;
    # the EMA target, which the student does not pull along, leaves more of them than LCM_LORA's rate hides
    options = dict(LCM_LORA, pretrained=base, learning_rate=1e-3)
    run(data, cache, tmp_path / "1", **options)
    log = launch(["--multi_gpu", "--num_processes", "2"],
                 flags(data, cache, tmp_path / "2", train_batch_size=2, **options))  # fmt: skip
    assert "global batch 4" in log
    one, two = (load_file(tmp_path / d / "final" / "pytorch_lora_weights.safetensors") for d in "12")
    difference = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    assert difference.mean() < 1e-6 and (difference > 1e-5).float().mean() < 1e-3  # float32 sums' order


def test_an_interrupted_distillation_resumed_ends_with_the_same_adapter(
    data, cache, base, tmp_path, monkeypatch
):
    options = dict(pretrained=base, **LCM_LORA, max_steps=4, checkpoint_every=2)
    run(data, cache, tmp_path / "straight", **options)
    run_killed_at(monkeypatch, 3, lambda: run(data, cache, tmp_path / "resumed", **options))
    run(data, cache, tmp_path / "resumed", **options, resume="latest")
    a, b = (
        load_file(tmp_path / name / "final" / "pytorch_lora_weights.safetensors")
        for name in ("straight", "resumed")
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_checkpoint_of_before_the_ema_target_resumes_only_as_it_was_trained(data, cache, base, tmp_path):
    options = dict(pretrained=base, **LCM_LORA, max_steps=4, checkpoint_every=2)
    run(data, cache, tmp_path, **dict(options, max_steps=2, lcm_target_decay=0.0))
    checkpoint = tmp_path / "checkpoint-2"
    saved = json.loads((checkpoint / "config.json").read_text())
    del saved["lcm_target_decay"]  # as sdlite wrote it before the key existed
    (checkpoint / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="resume it with --lcm_target_decay 0"):
        run(data, cache, tmp_path, **options, resume="latest")
    run(data, cache, tmp_path, **dict(options, lcm_target_decay=0.0), resume="latest")
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_a_full_weight_student_trains_the_unet_and_its_teacher_stays_the_base(
    data, cache, base, tmp_path, capsys
):
    with trainers_kept() as runs:
        final = run(data, cache, tmp_path, pretrained=base, distill="lcm", max_steps=2, ema_decay="none")
    before = load_components(base).unet.state_dict()
    after = load_components(final).unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student trained"
    teacher = runs[0].distiller.teacher.unet.state_dict()
    assert all(torch.equal(before[k], teacher[k]) for k in before), "the teacher did not"
    assert "--scheduler lcm --steps 4 --guidance 1" in capsys.readouterr().out  # the line it prints


def test_heuns_solver_asks_the_guided_teacher_at_both_ends_of_the_step_and_moves_the_adapter_elsewhere(
    distilled, data, cache, base, tmp_path, monkeypatch
):
    calls, guided_teacher = [], ConsistencyDistillation.guided_teacher

    def counted(self, z, t, *rest):
        calls.append(t.clone())
        return guided_teacher(self, z, t, *rest)

    monkeypatch.setattr(ConsistencyDistillation, "guided_teacher", counted)
    final = run(data, cache, tmp_path, pretrained=base, **LCM_LORA, lcm_solver="heun")
    assert len(calls) == 2 * 3 and all(torch.all(calls[i] - calls[i + 1] >= 0) for i in range(0, 6, 2))
    assert any(not torch.equal(calls[i], calls[i + 1]) for i in range(0, 6, 2)), "t_{n+k} then t_n"
    ddim = load_file(distilled[0] / "final" / "pytorch_lora_weights.safetensors")
    heun = load_file(final / "pytorch_lora_weights.safetensors")
    assert ddim.keys() == heun.keys() and all(v.isfinite().all() for v in heun.values())
    assert any(not torch.allclose(ddim[k], heun[k], atol=1e-6) for k in ddim), "the same target as DDIM's"


def test_an_sdxl_lcm_lora_gives_the_same_image_in_diffusers_as_in_ours(data, cache, tmp_path):
    folder = build_components_xl("tiny-sdxl", seed=0).save_pretrained(tmp_path / "base")
    final = run(data, cache, tmp_path / "run", pretrained=folder, distill="lcm", lora="true", lora_rank=4,
                learning_rate=1e-2, max_steps=2)  # fmt: skip
    parts = with_lcm_scheduler(load_components_xl(folder))
    ours = TextToImageXLPipeline(**copy.deepcopy(parts).as_dict())
    theirs = StableDiffusionXLPipeline(**copy.deepcopy(parts).as_dict(), add_watermarker=False)
    images = []
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(final)
        out = pipe("a red circle", num_inference_steps=4, guidance_scale=1.0, output_type="np",
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
        images.append(out.images)
    assert np.abs(images[0] - images[1]).max() <= 1e-4


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(distill="lcm"), "without pretrained"),
        (dict(distill="lcm", pretrained="x", caption_dropout=0.1), "caption_dropout"),
        (dict(distill="lcm", pretrained="x", train_text_encoder="true"), "train_text_encoder"),
        (dict(distill="lcm", pretrained="x", snr_gamma=5), "snr_gamma"),
        (dict(distill="lcm", pretrained="x", textual_inversion_token="<w>"), "textual_inversion_token"),
        (dict(distill="lcm", pretrained="x", lcm_w_min=4, lcm_w_max=2), "above lcm_w_max"),
        (dict(distill="lcm", pretrained="x", lcm_guidance_interval="300,0"), "lcm_guidance_interval"),
        (dict(distill="lcm", pretrained="x", lcm_ddim_steps=0), "lcm_ddim_steps"),
        (dict(distill="lcm", pretrained="x", lcm_solver="dpm"), "use ddim or heun"),
        (dict(distill="lcm", pretrained="x", lcm_target_decay=1.0), "lcm_target_decay"),
        (dict(lcm_solver="heun"), "lcm_solver set without distill lcm"),
        (dict(distill="lcd"), "use lcm or none"),
        (dict(lcm_w_max=3.0), "without distill lcm"),
    ],
)
def test_distillation_settings_that_cannot_work_fail_before_training(data, tmp_path, options, words):
    with pytest.raises(ConfigError, match=words):
        run(data, tmp_path, tmp_path, **options)


def test_the_demo_lcm_recipe_is_an_lcm_lora_train_config():
    cfg = parse_config(TrainConfig, ["--config", str(ROOT / "configs" / "demo-lcm.yaml")])
    assert cfg.distillation.lcm and cfg.adapters.lora and cfg.adapters.lora_save_format == "kohya"
    assert cfg.validation.validation_guidance == 1.0 and cfg.validation.validation_inference_steps <= 8


def test_generate_and_evaluate_sample_with_lcm_scheduler_and_the_lora(distilled, base, tmp_path):
    assert isinstance(make_scheduler("lcm", load_components(base).scheduler.config), LCMScheduler)
    grids = {}
    for name, loras in (("plain", []), ("lcm", [(str(distilled[0] / "final"), None)])):
        grids[name] = tmp_path / f"{name}.png"
        few = dict(n=1, colours=["red"], shapes=["circle"], bpd_count=2, stride=500, bpd_draws=1)
        sampler = dict(steps=2, guidance=1.0, guidance_interval=None, scheduler="lcm", loras=loras)
        report = run_evaluation(str(base), grid_path=grids[name], **sampler, **few)
        assert report["scheduler"] == "lcm" and report["steps"] == 2
    assert grids["plain"].read_bytes() != grids["lcm"].read_bytes(), "the LoRA was not loaded"


def test_generate_and_evaluate_sample_an_lcm_lora_at_the_timesteps_given(
    distilled, base, tmp_path, monkeypatch
):
    """--timesteps: LCMScheduler at those timesteps, as diffusers' pipeline with timesteps= draws them."""
    from PIL import Image

    # the command's threads as the test's own (conftest.py): the images are compared to the unit
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("SDLITE_TEST_THREADS", "1"))
    final, out = distilled[0] / "final", tmp_path / "out.png"
    argv = ["generate", "a red circle", "--model", str(base), "--lora", str(final), "--scheduler", "lcm",
            "--guidance", "1", "--seed", "0", "--out", str(out)]  # fmt: skip
    assert sdlite([*argv, "--timesteps", "599,279"]) == 0
    drawn = np.asarray(Image.open(out), dtype=np.float32)
    assert sdlite([*argv, "--steps", "2"]) == 0  # LCMScheduler's own two: 999, 499
    assert np.abs(np.asarray(Image.open(out), dtype=np.float32) - drawn).max() > 1

    parts = with_lcm_scheduler(load_components(base)).as_dict()
    theirs = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)  # fmt: skip
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(final)
    expected = theirs(["a red circle"], timesteps=[599, 279], guidance_scale=1.0, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert np.abs(drawn - np.round(expected * 255)).max() <= 1

    few = dict(n=1, colours=["red"], shapes=["circle"], bpd_count=2, stride=500, bpd_draws=1)
    report = run_evaluation(str(base), guidance=1.0, guidance_interval=None, scheduler="lcm",
                            loras=[(str(final), None)], timesteps=[599, 279], **few)  # fmt: skip
    assert report["steps"] == 2 and report["timesteps"] == [599, 279]
