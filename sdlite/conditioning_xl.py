"""What an SDXL U-Net is conditioned on, computed once here for the pipeline, the trainer and its cache.

Podell et al. 2023 (sec. 2.1-2.2) condition the U-Net on

- the penultimate hidden states of both text encoders, concatenated along the features:
  c = [h_{-2}(CLIP-L) ; h_{-2}(OpenCLIP bigG)], (B, L, 768 + 1280) for SDXL, the cross-attention input;
- the pooled text embedding of encoder 2 (its EOS state through ``text_projection``), (B, 1280);
- six numbers per image, c_size = (h_orig, w_orig), c_crop = (top, left), c_target = (h, w): the size of
  the image before it was resized, where the training crop began, and the size generated.
  At sampling the usual choice is original = target = the requested size and crop = (0, 0).

The U-Net takes the last two as ``added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}`` and
embeds each of the six numbers sinusoidally itself (diffusers' ``add_time_proj``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdlite.tokenizer import token_ids


def encode_prompts_xl(
    text_encoder,
    text_encoder_2,
    tokenizer,
    tokenizer_2,
    prompts: Sequence[str],
    prompts_2=None,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, d1 + d2) penultimate states of both encoders and (B, p) pooled embeddings of encoder 2.

    prompts_2: what encoder 2 reads (SDXL's ``prompt_2``); the same prompts when None.
    clip_skip: take both encoders' states this many layers before the penultimate (diffusers' meaning).
    Gradients flow when enabled (training LoRA on the encoders); pipelines and the embedding cache call
    it under ``torch.no_grad()``.
    """
    prompts = list(prompts)
    prompts_2 = prompts if prompts_2 is None else list(prompts_2)
    if len(prompts_2) != len(prompts):
        raise ValueError(
            f"prompts_2 has {len(prompts_2)} prompts but prompts has {len(prompts)}: pass one each"
        )
    ids = token_ids(tokenizer, prompts) if text_encoder is not None else None
    ids_2 = token_ids(tokenizer_2, prompts_2)
    return encode_ids_xl(text_encoder, text_encoder_2, ids, ids_2, clip_skip)


def encode_ids_xl(
    text_encoder,
    text_encoder_2,
    input_ids: torch.Tensor,
    input_ids_2: torch.Tensor,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_prompts_xl`` from token ids: (B, L) of each tokenizer -> (B, L, d1 + d2) and (B, p)."""
    states = []
    for encoder, ids in ((text_encoder, input_ids), (text_encoder_2, input_ids_2)):
        if encoder is None:  # SDXL's refiner conditions on encoder 2 alone
            continue
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-(2 + (clip_skip or 0))])
    pooled = out.text_embeds  # encoder 2 (CLIPTextModelWithProjection): projected EOS state
    return torch.cat(states, dim=-1), pooled


def add_time_ids(
    original_size: Sequence[int] | torch.Tensor,
    crop_top_left: Sequence[int] | torch.Tensor,
    target_size: Sequence[int] | torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The six size/crop numbers, (6,) for one image or (B, 6) when each argument is (B, 2):
    (h_orig, w_orig, top, left, h_target, w_target), in pixels."""
    parts = [torch.as_tensor(x, dtype=dtype) for x in (original_size, crop_top_left, target_size)]
    if any(p.shape[-1] != 2 for p in parts):
        raise ValueError(
            "original_size, crop_top_left and target_size are (height, width), (top, left), (height, width): "
            f"two numbers each, got shapes {[tuple(p.shape) for p in parts]}"
        )
    return torch.cat(parts, dim=-1)
