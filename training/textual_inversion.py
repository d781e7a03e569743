"""Textual inversion (Gal et al. 2022, https://arxiv.org/abs/2208.01618): teach a frozen model a new word
by training its embedding vectors alone.

The word (``textual_inversion_token``, e.g. ``<magenta>``) is added to each tokenizer, as n tokens when it
has n vectors (``<w>``, ``<w>_1``, ... ``<w>_{n-1}``, diffusers' spelling, which the pipelines apply to
prompts and the family to captions). Each text encoder's token table is wrapped by ``NewWordEmbedding``:
the table itself stays frozen and untouched (every other word keeps its vectors bit for bit), and the
word's rows are a separate parameter, the only one the optimizer sees, started at the mean embedding
of ``textual_inversion_init``'s tokens. Captions must name the word: those that do not teach it nothing.

The result is written in the forms people share (sdlite.textual_inversion reads them all):
    SD     learned_embeds.safetensors {word: (n, d)} (diffusers' ``load_textual_inversion``), and
           <word>.safetensors {"emb_params": (n, d)} (A1111, ComfyUI: the file's name is the word)
    SDXL   <word>.safetensors {"clip_l": (n, 768), "clip_g": (n, 1280)} (A1111, ComfyUI; diffusers loads
           each half with ``load_textual_inversion(state["clip_l"], token=..., text_encoder=...,
           tokenizer=...)``)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch

from sdlite.textual_inversion import SDXL_KEYS

if TYPE_CHECKING:
    from training.config.inversion import TextualInversionSection
    from training.family import StableDiffusion

DIFFUSERS_FILE = "learned_embeds.safetensors"


class NewWordEmbedding(torch.nn.Module):
    """A frozen token table plus n trained rows for the ids after it: ids < V read the table, ids V..V+n-1
    the new ``vectors`` (n, d)."""

    def __init__(self, table: torch.nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.table = table.requires_grad_(False)
        self.vectors = torch.nn.Parameter(vectors.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The whole (V + n, d) table, for code that reads an encoder's input embeddings' weight."""
        return torch.cat([self.table.weight, self.vectors.to(self.table.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, d)
        size = self.table.num_embeddings
        known = self.table(ids.clamp(max=size - 1))
        new = self.vectors[(ids - size).clamp(min=0)].to(known.dtype)
        return torch.where((ids < size)[..., None], known, new)


def spelling(token: str, count: int) -> list[str]:
    """The tokens of a word of ``count`` vectors: ``<w>``, ``<w>_1``, ... (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def encoder_pairs(family: StableDiffusion) -> dict[str, tuple]:
    """{the embedding file's key: (tokenizer, text encoder)}: SD's one ("") or SDXL's clip_l and clip_g."""
    parts = family.parts
    if len(family.encoders) == 1:
        return {"": (parts.tokenizer, parts.text_encoder)}
    return dict(
        zip(SDXL_KEYS, ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)))
    )


def attach_word(family: StableDiffusion, section: TextualInversionSection) -> dict[str, NewWordEmbedding]:
    """Add the word to every tokenizer and text encoder, freeze everything but its vectors, and have the
    family spell it out in captions; returns {file key: the encoder's NewWordEmbedding}."""
    token, count = section.textual_inversion_token, section.textual_inversion_vectors
    family.parts.unet.requires_grad_(False)
    words = {}
    for key, (tokenizer, encoder) in encoder_pairs(family).items():
        known = [t for t in spelling(token, count) if t in tokenizer.get_vocab()]
        if known:
            raise ValueError(
                f"textual_inversion_token {token!r}: the tokenizer knows {known[0]!r} already; choose a word "
                "it does not know, e.g. <my-word>"
            )
        table = encoder.get_input_embeddings()
        init = tokenizer(section.textual_inversion_init, add_special_tokens=False).input_ids
        if not init:
            raise ValueError(
                f"textual_inversion_init {section.textual_inversion_init!r} has no tokens: give a word"
            )
        start = table.weight[init].detach().mean(dim=0).expand(count, -1)
        tokenizer.add_tokens(spelling(token, count))
        if len(tokenizer) != table.num_embeddings + count:
            raise ValueError(
                f"the tokenizer has {len(tokenizer) - count} entries where its text encoder's table has "
                f"{table.num_embeddings}: new ids would not follow the table"
            )
        encoder.requires_grad_(False)
        words[key] = NewWordEmbedding(table, start)
        encoder.set_input_embeddings(words[key])
    family.words = spelling(token, count)
    return words


def word_checkpoint(words: dict[str, NewWordEmbedding]) -> torch.nn.Module:
    """A module whose parameters are the word's vectors, shared: what a checkpoint holds of the model."""
    return torch.nn.ParameterDict({key or "text_encoder": word.vectors for key, word in words.items()})


def file_name(token: str) -> str:
    """``<word>.safetensors`` with characters no file system takes (``<>:"/\\|?*``) dropped."""
    return re.sub(r'[<>:"/\\|?*]', "", token) or "embedding"


def save_word(folder: Path, token: str, words: dict[str, NewWordEmbedding]) -> list[Path]:
    """Write the word's vectors in diffusers' form (SD) and A1111's (both families); returns the files."""
    vectors = {key: word.vectors.detach().float().cpu().contiguous() for key, word in words.items()}
    a1111 = folder / f"{file_name(token)}.safetensors"
    if set(vectors) == set(SDXL_KEYS):
        safetensors.torch.save_file(vectors, a1111)
        return [a1111]
    safetensors.torch.save_file({"emb_params": vectors[""]}, a1111)
    safetensors.torch.save_file({token: vectors[""]}, folder / DIFFUSERS_FILE)
    return [folder / DIFFUSERS_FILE, a1111]
