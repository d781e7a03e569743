"""Sharded training (training/sharding.py, FSDP2 over gloo on this CPU): each process holds half of the
model, 2 sharded processes train the weights of 1 (with gradient accumulation and clipping), a killed
sharded run resumes exactly from its DCP checkpoint, and what FSDP cannot do is refused in one line.

"The weights of 1" is test_train.py's tolerance (float32 summation order): FSDP reduce-scatters the
gradients where DDP all-reduces them, a different order of the same sums.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.commands.config.config_args import load_config_from_file
from test_train import ROOT, assert_same_training, flags, free_port, weights

from sdlite.presets import get_preset
from training.accelerator import setup_accelerator
from training.checkpoint import MARKER, OWNED, CheckpointError, is_ours
from training.config import parse_config
from training.config.unet import TrainConfig
from training.optim import make_optimizer
from training.sharding import (
    ShardedEMA,
    Sharding,
    gathered,
    grad_norm,
    held,
    launch_sharding,
    mixed_precision_policy,
    optimizer_tensors,
    shard_model,
    sharding_refusals,
    unsharded_models,
)
from training.train import main
from training.trainer import Trainer
from training.unet_step import Denoiser

CONFIGS = ROOT / "configs" / "accelerate"
# Gradient accumulation and clipping that bites (the tiny U-Net's gradient norm is ~0.7-1 at lr 1e-3).
RUN = dict(max_steps=4, checkpoint_every=2, max_grad_norm=0.05)


# ---- one step, sharded by hand in 2 processes --------------------------------------------------------


def _shard_and_step(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel

    found = {}
    for reshard_after_forward in (True, False):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**get_preset("tiny").config("unet"))
        whole = {k: v.clone() for k, v in unet.state_dict().items()}
        model = Denoiser(unet)
        shard_model(model, Sharding(reshard_after_forward))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, lr=1e-3)
        ema = ShardedEMA(model, params, 0.9)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(rank))
        model(x, torch.tensor([10, 500]), torch.randn(2, 16, 64)).pow(2).mean().backward()
        norm = grad_norm(params, 0.05)
        counts = {"parameters": held(params), "gradients": held(p.grad for p in params)}
        optimizer.step()
        ema.update(params)
        counts["optimizer state"] = held(optimizer_tensors(optimizer))
        weights = gathered(model)  # the whole trained weights, on rank 0 only
        trained = {k: p.detach().full_tensor() for k, p in model.named_parameters()}
        with ema.swapped_into(params):
            averaged = {k: p.detach().full_tensor() for k, p in model.named_parameters()}
        if rank == 0:
            copy = unsharded_models(model, weights)["unet"]
            assert all(torch.equal(v, trained[f"unet.{k}"]) for k, v in copy.state_dict().items())
            moved = [not torch.equal(v, whole[k]) for k, v in copy.state_dict().items()]
            counts["moved"], counts["norm"] = (sum(moved), len(moved)), float(norm)
            counts["ema between"] = all(
                torch.all(
                    (averaged[k] - whole[k[5:]]).abs() <= (trained[k] - whole[k[5:]]).abs() + 1e-7
                ).item()
                for k in trained
            )
        # A step whose gradients are NaN changes nothing: the trainer's guard, on sharded gradients
        model(x * float("nan"), torch.tensor([10, 500]), torch.randn(2, 16, 64)).mean().backward()
        trainer = SimpleNamespace(accelerator=SimpleNamespace(scaler=None), params=params, sharding=True,
                                  cfg=SimpleNamespace(optimizer=SimpleNamespace(max_grad_norm=0.05)),
                                  optimizer=SimpleNamespace(optimizer=optimizer))  # fmt: skip
        skipped = Trainer.skip_if_nonfinite(trainer, torch.tensor(False))
        optimizer.step()
        counts["nan step skipped"] = bool(skipped) and all(
            torch.equal(p.detach().full_tensor(), trained[k]) for k, p in model.named_parameters()
        )
        found["ZeRO-3" if reshard_after_forward else "ZeRO-2"] = counts
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(found, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    mp.spawn(_shard_and_step, args=(int(free_port()), str(out)), nprocs=2)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("style", ["ZeRO-3", "ZeRO-2"])
@pytest.mark.parametrize("what", ["parameters", "gradients", "optimizer state"])
def test_each_process_holds_half_of_the_parameters_gradients_and_optimizer_state(shards, style, what):
    (mine, whole), (theirs, whole_too) = shards[0][style][what], shards[1][style][what]
    assert whole == whole_too and mine + theirs == whole
    # AdamW: two moments per parameter; half each but for the rows of an odd first dimension
    assert whole == shards[0][style]["parameters"][1] * (2 if what == "optimizer state" else 1)
    assert abs(mine - theirs) / whole < 0.01, (mine, theirs, whole)


@pytest.mark.parametrize("style", ["ZeRO-3", "ZeRO-2"])
def test_a_sharded_step_moves_every_weight_into_the_gathered_copy_and_a_nan_step_none(shards, style):
    moved, total = shards[0][style]["moved"]
    assert moved == total  # every tensor changed, and the unsharded copy holds the trained values
    assert shards[0][style]["norm"] > 0.05  # so the clipping bit
    assert shards[0][style]["ema between"]  # the EMA lies between the start and the trained weights
    assert shards[0][style]["nan step skipped"] and shards[1][style]["nan step skipped"]


# ---- training/train.py under configs/accelerate/fsdp.yaml ----------------------------------------------


def start(config: str, args: list[str], processes: int = 2) -> subprocess.Popen:
    """``accelerate launch`` of train.py with ``processes`` under ``config``, in its own session."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [accelerate, "launch", "--config_file", str(CONFIGS / config), "--num_processes", str(processes),
              "--main_process_port", free_port()]  # fmt: skip
    command = [*launch, str(ROOT / "training" / "train.py"), *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def kill(process: subprocess.Popen) -> None:
    """SIGKILL the launch and its ranks, as a machine going away would: torchrun starts each rank in a
    session of its own, so the launcher's process group does not reach them."""
    ranks = psutil.Process(process.pid).children(recursive=True)
    for rank in ranks:
        rank.kill()
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    psutil.wait_procs(ranks, timeout=30)


def finish(process: subprocess.Popen, timeout: int = 400) -> str:
    try:
        log = process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"launch timed out:\n{process.communicate()[0][-5000:]}") from None
    assert process.returncode == 0, log[-6000:]
    return log


@pytest.fixture(scope="module")
def one(data, cache, tmp_path_factory):
    """One process, batch 4, unsharded."""
    out = tmp_path_factory.mktemp("one")
    main(flags(data, cache, out, train_batch_size=4, **RUN))
    return out


def sharded_flags(data, cache, out, **overrides) -> list[str]:
    """2 processes x batch 1 x 2 accumulation steps: the global batch of ``one``."""
    return flags(data, cache, out, train_batch_size=1, gradient_accumulation_steps=2, **{**RUN, **overrides})


@pytest.fixture(scope="module")
def sharded(data, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    validation = dict(val_data_dir=data / "test", validation_prompts='["a red circle"]',
                      validation_inference_steps=2)  # fmt: skip
    log = finish(start("fsdp.yaml", sharded_flags(data, cache, out, **validation)))
    return out, log


def test_two_sharded_processes_train_the_weights_of_one_with_accumulation_and_clipping(one, sharded):
    out, log = sharded
    assert "global batch 4" in log
    for rank in (0, 1):
        assert f"FSDP (ZeRO-3 style): process {rank} holds 2.07 M of the 4.13 M trained parameters" in log
    assert_same_training(one, out)
    assert_same_training(one, out, "unet")  # the EMA, averaged shard by shard
    assert "val/loss" in log and (out / "validation" / "step-4.png").is_file()  # validated on both


def test_a_sharded_checkpoint_is_one_marked_folder_with_every_shards_checksum(sharded, tmp_path):
    checkpoint = sharded[0] / "checkpoint-4"
    sums = json.loads((checkpoint / MARKER).read_text())["sha256"]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng-0.safetensors", "rng-1.safetensors",
            "state.json"} <= set(sums)  # fmt: skip
    # no whole weights or optimizer state anywhere: only each process's random state beside the shards
    assert {p.name for p in checkpoint.glob("*.safetensors")} == {"rng-0.safetensors", "rng-1.safetensors"}
    assert not (checkpoint / "optimizer.pt").exists()
    # what a kill leaves (no marks) is still recognisably ours, so a later run removes it
    left = tmp_path / "checkpoint-6.tmp"
    shutil.copytree(checkpoint, left)
    (left / MARKER).unlink()
    (left / OWNED).unlink()
    assert is_ours(left)


def test_a_killed_sharded_run_resumes_from_its_latest_checkpoint_exactly(data, cache, sharded, tmp_path):
    args = sharded_flags(data, cache, tmp_path)
    process = start("fsdp-zero2.yaml", args)  # ZeRO-2 style to the kill, ZeRO-3 after: the same numbers
    while not (tmp_path / "checkpoint-2" / MARKER).is_file() and process.poll() is None:
        time.sleep(0.05)
    kill(process)
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoint-4").exists()
    log = finish(start("fsdp.yaml", [*args, "--resume", "latest"]))
    assert "resumed from" in log and "at step 2" in log
    for part in ("unet_raw", "unet"):
        a, b = weights(sharded[0] / "final", part), weights(tmp_path / "final", part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_a_sharded_checkpoint_of_2_processes_resumes_on_4(data, cache, sharded, tmp_path):
    shutil.copytree(sharded[0] / "checkpoint-2", tmp_path / "checkpoint-2")
    # 4 processes x batch 1: the global batch of 2 x 1 x 2 accumulation steps; DCP reshards on loading
    args = flags(data, cache, tmp_path, train_batch_size=1, resume="latest",
                 allow_config_change="gradient_accumulation_steps", **RUN)  # fmt: skip
    log = finish(start("fsdp.yaml", args, processes=4), timeout=600)
    assert "at step 2" in log and "process 3 holds 1.03 M of the 4.13 M" in log
    assert_same_training(sharded[0], tmp_path)
    assert_same_training(sharded[0], tmp_path, "unet")


def test_a_sharded_checkpoint_is_refused_by_an_unsharded_run_naming_fsdp(data, cache, sharded, tmp_path):
    shutil.copytree(sharded[0] / "checkpoint-4", tmp_path / "checkpoint-4")
    with pytest.raises(CheckpointError, match=r"sharded \(FSDP\) run"):
        main(sharded_flags(data, cache, tmp_path, resume="latest", max_steps=6))


# ---- the launch's choices and refusals ----------------------------------------------------------------


def test_the_launch_config_picks_zero3_or_zero2_style():
    styles = {}
    for name in ("fsdp", "fsdp-zero2"):
        fsdp = load_config_from_file(str(CONFIGS / f"{name}.yaml")).fsdp_config
        env = {"ACCELERATE_USE_FSDP": "true",
               "FSDP_RESHARD_AFTER_FORWARD": str(fsdp["fsdp_reshard_after_forward"]),
               "FSDP_TRANSFORMER_CLS_TO_WRAP": fsdp["fsdp_transformer_layer_cls_to_wrap"]}  # fmt: skip
        styles[name] = launch_sharding(env).style
    assert styles == {"fsdp": "ZeRO-3", "fsdp-zero2": "ZeRO-2"}
    assert launch_sharding({}) is None
    assert (
        launch_sharding({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP"}).style
        == "ZeRO-2"
    )
    with pytest.raises(ValueError, match="fsdp_reshard_after_forward"):
        launch_sharding({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "HYBRID_SHARD"})


def test_deepspeed_is_refused_naming_fsdp(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(NotImplementedError, match="FSDP2 instead.*fsdp.yaml"):
        setup_accelerator(tmp_path, report_to=None, shards=True)


def test_what_fsdp_cannot_train_is_refused_in_one_line_with_the_reason(data, tmp_path):
    cfg = parse_config(TrainConfig, ["--train_data_dir", str(data / "train"), "--output_dir", str(tmp_path),
                                     "--lora", "true", "--use_8bit_adam", "true",
                                     "--train_text_encoder", "true"])  # fmt: skip
    problems = sharding_refusals(cfg, "fp16")
    assert [p.split(":")[0] for p in problems] == [
        "lora", "train_text_encoder", "mixed_precision fp16", "use_8bit_adam"
    ]  # fmt: skip
    assert "ddp.yaml" in problems[0] and "DDP" in problems[1] and "bf16" in problems[2]
    cfg = parse_config(TrainConfig, ["--train_data_dir", str(data / "train"), "--output_dir", str(tmp_path)])
    assert sharding_refusals(cfg, "bf16") == []
    word = parse_config(TrainConfig, ["--train_data_dir", str(data / "train"), "--output_dir", str(tmp_path),
                                      "--textual_inversion_token", "<shape>"])  # fmt: skip
    assert [p.split(":")[0] for p in sharding_refusals(word, None)] == ["textual inversion"]
    lcm = ["--train_data_dir", str(data / "train"), "--output_dir", str(tmp_path), "--distill", "lcm",
           "--pretrained", str(tmp_path)]  # fmt: skip
    refused = sharding_refusals(parse_config(TrainConfig, lcm), None)
    assert [p.split(":")[0] for p in refused] == ["distill lcm with lcm_target_decay"]
    assert sharding_refusals(parse_config(TrainConfig, [*lcm, "--lcm_target_decay", "0"]), None) == []


def test_sdxl_trains_under_zero2_style_sharding_as_in_one_process(data, cache, tmp_path):
    from accelerate.state import AcceleratorState

    from pipelines import TextToImageXLPipeline

    xl = dict(preset="tiny-sdxl", max_steps=2, checkpoint_every=2, max_grad_norm=0.05)
    AcceleratorState._reset_state(reset_partial_state=True)  # ``one`` ran in this process before
    main(flags(data, cache, tmp_path / "one", train_batch_size=4, **xl))
    args = flags(data, cache, tmp_path / "two", train_batch_size=2, validation_prompts='["a red circle"]',
                 validation_inference_steps=2, **xl)  # fmt: skip
    log = finish(start("fsdp-zero2.yaml", args))
    assert "FSDP (ZeRO-2 style)" in log and (tmp_path / "two" / "validation" / "step-2.png").is_file()
    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert_same_training(tmp_path / "one", tmp_path / "two", "unet")
    pipe = TextToImageXLPipeline.from_pretrained(tmp_path / "two" / "final")
    assert pipe.unet.config.sample_size == 8


def test_bf16_gathers_bf16_weights_on_gpus_and_fp32_ones_under_autocast_on_cpus():
    gpu = mixed_precision_policy("bf16", torch.device("cuda"))
    assert gpu.param_dtype == torch.bfloat16 and gpu.reduce_dtype == gpu.output_dtype == torch.float32
    assert mixed_precision_policy("bf16", torch.device("cpu")).param_dtype is None
    assert mixed_precision_policy("no", torch.device("cuda")).param_dtype is None
