"""Sharded training (FSDP2: torch's ``fully_shard``), applied by sdlite itself on GPUs and on CPUs over gloo.

    accelerate launch --config_file configs/accelerate/fsdp.yaml training/train.py --config ...

Each of N processes keeps 1/N of every U-Net parameter (a DTensor shard), of its gradient and of its
AdamW state (the U-Net alone is sharded: see ``sharding_refusals``); a block's whole weights exist only
while it runs (all-gathered before its forward and its backward; gradients reduce-scattered after).
Where the gathered weights go after the forward is the one choice (``reshard_after_forward``, read from
the accelerate config):

    true   ZeRO-3 style: freed after the forward, gathered again for the backward (least memory)
    false  ZeRO-2 style: kept from the forward to the backward (one all-gather less a step, but a whole
           copy of the weights at the peak)

accelerate's own FSDP plugin runs only on GPU-like devices; sdlite shards the model itself on every
device, so that what the CPU tests check is what runs on GPUs. The rest of a run follows the shards:
the EMA averages each process's shards, a checkpoint is written by every process with
torch.distributed.checkpoint (DCP, resharded on load, so another process count can resume it), and
validation runs on every process, each gathering blocks as it goes; only the final folder gathers
whole weights, on the main process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from training.optim import EMA

if TYPE_CHECKING:
    from training.config.unet import TrainConfig

# Shard units when the launch names none: the U-Net's ResNet and transformer blocks.
UNITS = ("ResnetBlock2D", "BasicTransformerBlock")
RESHARD = {"true": True, "false": False, "full_shard": True, "shard_grad_op": False}  # FSDP1's names too
LAUNCH_FIX = (
    "in the accelerate config, set fsdp_reshard_after_forward to true (ZeRO-3 style) or false (ZeRO-2 style)"
)


@dataclass(frozen=True)
class Sharding:
    """How a run shards its trained models: see the module's docstring."""

    reshard_after_forward: bool
    units: tuple[str, ...] = UNITS  # class names of the modules sharded as units of their own

    @property
    def style(self) -> str:
        return "ZeRO-3" if self.reshard_after_forward else "ZeRO-2"


def launch_sharding(environ: Mapping[str, str] = os.environ) -> Sharding | None:
    """The sharding ``accelerate launch`` asked for (fsdp.yaml, or --use_fsdp), from the environment it
    sets; None without FSDP."""
    if environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return None
    value = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if value not in RESHARD:
        raise ValueError(f"FSDP sharding {value!r} is not one sdlite runs: {LAUNCH_FIX}")
    units = tuple(n.strip() for n in environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip())
    return Sharding(RESHARD[value], units or UNITS)


def mixed_precision_policy(mixed_precision: str | None, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 on GPUs: blocks gathered and run in bf16, gradients reduced and kept in fp32 (the fp32 shards
    are what the optimizer steps), the model's output in fp32 for the loss; the forward also runs under
    autocast (train.py), which keeps GPU group norms in fp32. On CPUs, whose autocast runs group norm in
    bf16 only with bf16 weights, the gathered weights stay fp32 under autocast, as without sharding.
    fp16 is refused before this (its loss scaler does not take sharded gradients)."""
    if mixed_precision != "bf16" or device.type == "cpu":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32
    )


def shard_model(
    model: torch.nn.Module, sharding: Sharding, mixed_precision: str | None = None, device=torch.device("cpu")
) -> None:
    """``fully_shard`` the unit blocks of each trained child of ``model`` (the U-Net, trained text
    encoders), each such child, then ``model`` itself (the root). Each child is a unit so that a pipeline
    calling it directly (validation) gathers its weights; parameters of no unit fall to the root."""
    policy = mixed_precision_policy(mixed_precision, torch.device(device))
    options = dict(reshard_after_forward=sharding.reshard_after_forward, mp_policy=policy)
    for child in model.children():
        if not any(p.requires_grad for p in child.parameters()):
            continue
        for module in reversed(list(child.modules())):  # inner units before the ones holding them
            if module is not child and type(module).__name__ in sharding.units:
                fully_shard(module, **options)
        fully_shard(child, **options)
    fully_shard(model, **options)


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered copy of the weights. A forward without gradients (validation) leaves the root's
    (and, ZeRO-2 style, every unit's) gathered, and the next forward would use that copy as it is: so
    after validation, and around changing the shards' values (the EMA's swap)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def held(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(elements this process holds, elements in all): of parameters, gradients or optimizer state."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0]
    return sum(local(t).numel() for t in tensors), sum(t.numel() for t in tensors)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's per-parameter state tensors (AdamW: both moments; not the step counts)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The gradients' total 2-norm over all processes (a plain tensor, the same on each), after clipping
    them to ``max_norm`` when > 0. The norm of sharded gradients is a partial sum on each process:
    ``full_tensor`` adds them up (one all-reduce), as clip_grad_norm_ would not for DTensors."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class ShardedEMA(EMA):
    """The EMA of a sharded model: the averages are DTensors sharded as the parameters are, so each process
    averages only its shards (1/N of the memory) and a checkpoint saves them as it saves the weights."""

    def __init__(self, model: torch.nn.Module, parameters: Iterable[torch.nn.Parameter], decay: float):
        super().__init__(parameters, decay)
        self.model = model

    @contextlib.contextmanager
    def swapped_into(self, parameters: Iterable[torch.nn.Parameter]):
        """Inside the block the parameters hold the averages. Copied, not swapped: FSDP gathers from the
        shards' own storage, which a swap of ``.data`` would leave as it was."""
        parameters = [p.detach() for p in parameters]
        with torch.no_grad():
            reshard(self.model)
            saved = [p.clone() for p in parameters]
            for p, s in zip(parameters, self.shadow):
                p.copy_(s)
            try:
                yield
            finally:
                reshard(self.model)
                for p, s in zip(parameters, saved):
                    p.copy_(s)


# ---- checkpoints and the final folder -------------------------------------------------------------------


def _state(model: torch.nn.Module, optimizer, ema: EMA | None) -> dict:
    """What a sharded checkpoint holds, as DTensors: DCP saves each process's shards and loads them in
    place, resharded to this run's processes."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save_sharded(folder: Path, model: torch.nn.Module, optimizer, ema: EMA | None) -> None:
    """Every process writes its shards into ``folder`` (__<rank>_0.distcp), the main one also .metadata.
    A failure on any process is a RuntimeError on all (DCP gathers them), as checkpoint.py expects."""
    try:
        dcp.save(_state(model, optimizer, ema), checkpoint_id=folder)
    except CheckpointException as e:  # a BaseException: it would pass every handler of write errors
        raise RuntimeError(f"torch.distributed.checkpoint: {str(e)[:300]}") from None


def load_sharded(folder: Path, model: torch.nn.Module, optimizer, ema: EMA | None) -> None:
    """Restore what ``save_sharded`` wrote, from any number of processes (every process calls it)."""
    state = _state(model, optimizer, ema)
    try:
        dcp.load(state, checkpoint_id=folder)  # in place: the EMA's averages are its own tensors
    except CheckpointException as e:
        raise RuntimeError(f"torch.distributed.checkpoint: {str(e)[:300]}") from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state["optimizer"])


def is_sharded_checkpoint(folder: Path) -> bool:
    return (folder / ".metadata").is_file()


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded model on the main process's CPU ({} on the others; all call it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def unsharded_models(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
    """Plain copies of the trained children of a sharded ``model`` (name -> module: unet, text_encoder, ...)
    holding ``weights`` (``gathered``'s), to save as a diffusers folder. Built on the meta device and given
    the gathered tensors themselves: no second copy of the weights, no random initialisation."""
    copies = {}
    for name, child in model.named_children():
        mine = {k.removeprefix(f"{name}."): v for k, v in weights.items() if k.startswith(f"{name}.")}
        if not mine:
            continue
        with torch.device("meta"):  # diffusers' models are made from_config, transformers' from theirs
            make = getattr(type(child), "from_config", type(child))
            copy = make(child.config)
        copy.load_state_dict(mine, assign=True)
        for path, buffer in child.named_buffers():  # buffers are never sharded; those not saved stay meta
            owner, _, leaf = path.rpartition(".")
            target = copy.get_submodule(owner)
            if target._buffers[leaf].is_meta:
                target._buffers[leaf] = buffer.detach().to("cpu", copy=True)
        copies[name] = copy.eval()
    return copies


def sharding_refusals(cfg: TrainConfig, mixed_precision: str | None) -> list[str]:
    """What a run under FSDP cannot do, one line each with the fix; checked before the model is built."""
    problems = []
    if cfg.adapters.lora:
        problems.append(
            "lora: FSDP saves memory by sharding gradients and AdamW state, which a LoRA run has only for "
            "its adapters (megabytes), while its frozen base can be stored in bf16 on each process: launch "
            "LoRA runs with configs/accelerate/ddp.yaml (or one process)"
        )
    if cfg.inverts:
        problems.append(
            "textual inversion: it trains one word's vectors (kilobytes) on a frozen model, nothing FSDP "
            "would shard: launch it with configs/accelerate/ddp.yaml (or one process)"
        )
    if cfg.model.train_text_encoder:
        problems.append(
            "train_text_encoder: only the U-Net is sharded (a CLIP encoder sharded inside the U-Net's "
            "forward returns no hidden states, which SDXL reads); train text encoders with DDP"
        )
    if cfg.distillation.lcm and cfg.distillation.lcm_target_decay:
        problems.append(
            "distill lcm with lcm_target_decay: the target's average is not sharded; set lcm_target_decay 0 "
            "(the student itself as its target) or launch with configs/accelerate/ddp.yaml"
        )
    if mixed_precision == "fp16":
        problems.append("mixed_precision fp16: its loss scaler does not take sharded gradients; use bf16")
    if cfg.optimizer.use_8bit_adam:
        problems.append("use_8bit_adam: bitsandbytes' AdamW8bit does not step DTensor shards; set it false")
    return problems
