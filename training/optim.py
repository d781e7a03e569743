"""The optimizer, its learning-rate schedule and the EMA of the weights, for any model.

A checkpoint holds all three (training/checkpoint.py), so a resumed run continues them exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler


def make_optimizer(
    params: Iterable[torch.nn.Parameter] | list[dict],
    lr: float,
    betas=(0.9, 0.999),
    weight_decay=1e-2,
    eps=1e-8,
    use_8bit: bool = False,
    kernel: str = "fused",
) -> torch.optim.Optimizer:
    """AdamW, its step run by ``kernel`` (see ``adamw``), or bitsandbytes' 8-bit AdamW (its two moments
    in 8 bits with a scale per block: 2 bytes a parameter instead of 8). ``params`` may be param groups
    ({"params": [...], "lr": ...}), each at its own learning rate."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    kw = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError(
                "use_8bit_adam needs bitsandbytes (pip install bitsandbytes, or sdlite[bnb]); or set "
                "use_8bit_adam false"
            ) from None
        return bnb.optim.AdamW8bit(params, **kw)
    return adamw(params, kernel, **kw)


def adamw(params: list, kernel: str, **kw) -> torch.optim.AdamW:
    """torch's AdamW with its step run by ``kernel``: "fused" (one kernel over all parameters, no
    temporaries), "foreach" (a few multi-tensor ops; their temporaries are as large as the parameters)
    or "loop" (one tensor at a time: temporaries of the largest tensor alone, slowest). "fused" falls
    back to "foreach" on a device or dtype without the fused kernel."""
    if kernel == "fused":
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError):
            kernel = "foreach"
    return torch.optim.AdamW(params, foreach=kernel == "foreach", **kw)


def make_lr_schedule(optimizer, name: str, warmup_steps: int, max_steps: int):
    """A diffusers.optimization schedule in optimizer steps: step it once per optimizer step, and do not
    pass it to ``accelerator.prepare``, which would step it once per process (diffusers' script bug)."""
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


class EMA:
    """Exponential moving average of parameters; decay at update k: min(decay, (1+k)/(10+k)), as diffusers,
    or ``decay`` from the first update without ``warmup`` (a consistency target's, training/lcm_step.py)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999, warmup: bool = True):
        self.decay, self.updates, self.warmup = decay, 0, warmup
        self.shadow = [p.detach().clone().float() for p in parameters]

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in parameters], 1 - decay)

    @contextlib.contextmanager
    def swapped_into(self, parameters: Iterable[torch.nn.Parameter]):
        """Inside the block the parameters hold the averages (swapped, not copied: no extra memory)."""
        parameters = list(parameters)
        for p, s in zip(parameters, self.shadow):
            p.data, s.data = s.data.to(p.dtype), p.data
        try:
            yield
        finally:
            for p, s in zip(parameters, self.shadow):
                p.data, s.data = s.data, p.data.float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(tensors[f"{i}"])
        self.updates = updates
