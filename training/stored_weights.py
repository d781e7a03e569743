"""Frozen weights stored in low precision (bf16, fp8) and upcast one layer at a time as it runs.

A LoRA run never updates the base model, so its weights need not be held in the precision the step
computes in: stored in bf16 they take half the memory of fp32, in fp8 (``torch.float8_e4m3fn``, as
kohya's ``--fp8_base``) a quarter. Each frozen ``Linear`` and ``Conv2d`` casts its weight to the dtype
it computes in when it runs (the input's, or autocast's), and its backward casts it again from the
stored weight rather than keeping the cast copy: the copy lives for one layer's call, so the stored
weights alone stay in memory through the step. The gradient that flows through a layer is that of the
rounded weights; the adapters themselves stay fp32 (training/family.py's ``attach_lora``).

The rounding is the price: bf16 keeps 8 bits of mantissa, e4m3 only 3 (about 6% relative error a
weight) and overflows above 448, which trained diffusion weights stay far below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in: autocast's where it is on, else its input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _UpcastLinear(torch.autograd.Function):
    """y = x W^T + b with W stored low; the backward needs W alone (W and b take no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        dtype = compute_dtype(x)
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class _UpcastConv2d(torch.autograd.Function):
    """A 2-D convolution with its kernel stored low; the backward needs the kernel and x's shape."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.shape, ctx.options = x.shape, (stride, padding, dilation, groups)
        dtype = compute_dtype(x)
        bias = None if bias is None else bias.to(dtype)
        return F.conv2d(x.to(dtype), weight.to(dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        dx = conv2d_input(ctx.shape, weight.to(grad.dtype), grad, *ctx.options)
        return dx, None, None, None, None, None, None


class StoredLinear(torch.nn.Linear):
    """A frozen ``Linear`` whose weight is stored low and upcast as it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastLinear.apply(x, self.weight, self.bias)


class StoredConv2d(torch.nn.Conv2d):
    """A frozen zero-padded ``Conv2d`` whose kernel is stored low and upcast as it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                   self.groups)  # fmt: skip


def _stored_class(module: torch.nn.Module) -> type | None:
    """The stored twin of a frozen layer that has one (exactly Linear, or a zero-padded Conv2d)."""
    if type(module) is torch.nn.Linear:
        stored = StoredLinear
    elif (
        type(module) is torch.nn.Conv2d
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        stored = StoredConv2d
    else:
        return None
    return None if module.weight.requires_grad else stored


def store_frozen_weights(model: torch.nn.Module, storage: str) -> int:
    """Store the weights of ``model``'s frozen Linear and Conv2d layers in ``storage`` ("bf16" or
    "fp8"), each layer upcast as it runs; biases, norms and every trained parameter keep their dtype.
    The layers keep their class's interface (a subclass: state-dict names and peft's wrappers are
    unchanged). Returns the bytes saved."""
    dtype, saved = STORAGE_DTYPES[storage], 0
    for module in model.modules():
        stored = _stored_class(module)
        if stored is None:
            continue
        before = module.weight.nbytes
        module.weight.data = module.weight.data.to(dtype)
        module.__class__ = stored
        saved += before - module.weight.nbytes
    return saved
