"""The Accelerator of a training run, for any model: one process, DDP on GPUs, or DDP over gloo on CPUs;
an FSDP launch for a trainer that shards its model itself (training/sharding.py), else refused before
anything is built, as DeepSpeed always is."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


def setup_accelerator(
    output_dir: str | Path,
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int = 1,
    report_to: str | None = "tensorboard",
    allow_tf32: bool = True,
    shards: bool = False,
) -> Accelerator:
    """The Accelerator of a run; logs go to ``output_dir/logs``. mixed_precision None: accelerate's
    config or launch flags decide. ``shards``: the trainer shards its model itself under an FSDP launch
    (training/sharding.py), so accelerate is given the processes as for DDP and never wraps the model."""
    # `accelerate launch --multi_gpu` on a machine without GPUs starts the processes, but accelerate
    # then runs each on its own; cpu=True joins them in one DDP group over gloo.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # Refuse sharded launches before building anything. The launch's environment is the test, not the
    # Accelerator's type: with cpu=True accelerate quietly runs an FSDP config as DDP (DeepSpeed too).
    launch = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}
    sharded = [name for name, variable in launch.items() if os.environ.get(variable, "").lower() == "true"]
    if "DeepSpeed" in sharded:
        raise NotImplementedError(
            "DeepSpeed: sdlite shards training with FSDP2 instead (parameters, gradients and optimizer "
            "state, ZeRO-3 or ZeRO-2 style): launch with configs/accelerate/fsdp.yaml or fsdp-zero2.yaml; "
            "docs/scale-out.md"
        )
    if sharded and shards:
        sharded = []
    if not sharded:
        with _fsdp_hidden():  # on GPUs accelerate would take the launch's FSDP for its own plugin
            accelerator = Accelerator(
                mixed_precision=mixed_precision,
                gradient_accumulation_steps=gradient_accumulation_steps,
                log_with=report_to or None,
                project_dir=str(Path(output_dir) / "logs"),
                cpu=cpu,
            )
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            sharded = [accelerator.distributed_type.value]
    if sharded:
        raise NotImplementedError(
            f"{sharded[0]}: this trainer's checkpoints and EMA assume every process holds whole parameters "
            "and optimizer state (one process or DDP): launch with configs/accelerate/ddp.yaml (one machine) "
            "or multi-node.yaml (several); training/train.py trains sharded (docs/scale-out.md)"
        )
    if allow_tf32 and torch.cuda.is_available():  # TF32 matmuls on Ampere and later: ~fp32 accuracy
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


@contextlib.contextmanager
def _fsdp_hidden():
    """accelerate's state reads ACCELERATE_USE_FSDP when it is made: hidden meanwhile, then put back."""
    value = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if value is not None:
            os.environ["ACCELERATE_USE_FSDP"] = value
