"""Textual-inversion embeddings (Gal et al. 2022, https://arxiv.org/abs/2208.01618): a new word whose
vectors are rows added to a text encoder's token embedding table, read from the files people share.

    diffusers       learned_embeds.safetensors      {token: (n, d) or (d,)}
    A1111 .pt       {"string_to_param": {"*": (n, d)}, "name": token, "string_to_token", "step", ...}
    A1111 .safetensors                              {"emb_params": (n, d)}, the token is the file's name
    SDXL (A1111, ComfyUI)                           {"clip_l": (n, 768), "clip_g": (n, 1280)}: one set
                                                    for each of SDXL's two encoders

A word of n vectors takes n tokens (``tok``, ``tok_1``, ... ``tok_{n-1}``), as in diffusers. A1111
writes the ``.pt`` format with ``torch.save``: it is read with ``torch.load(weights_only=True)``, which
builds tensors, numbers and strings and refuses anything that would run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SDXL_KEYS = ("clip_l", "clip_g")  # SDXL's text_encoder (CLIP ViT-L) and text_encoder_2 (OpenCLIP bigG)
DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
A1111_KEYS = ("string_to_param", "emb_params")


class EmbeddingFileError(ValueError):
    """An embedding file this module cannot read; the message names what and why."""


@dataclass
class Embedding:
    """A word and its vectors: ``{"": (n, d)}`` for one text encoder, ``{"clip_l", "clip_g"}`` for SDXL."""

    token: str
    vectors: dict[str, torch.Tensor]

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def family(self) -> str:
        return "SDXL" if set(self.vectors) == set(SDXL_KEYS) else "SD 1.x/2.x"


def read_embedding(source, token: str | None = None) -> Embedding:
    """The embedding in ``source``: a file, a folder with ``learned_embeds.safetensors``, or a state
    dict. ``token`` overrides the word the file names (or, for files that name none, its file name)."""
    name = None
    if isinstance(source, dict):
        state = source
    else:
        file = _file(Path(source))
        state, name = _load(file), file.stem
    named, vectors = _parse(state, name)
    token = token or named
    if not token:
        raise EmbeddingFileError("the embedding names no word: pass token='<the word>'")
    for key, tensor in vectors.items():
        vectors[key] = tensor.detach().float()[None] if tensor.ndim == 1 else tensor.detach().float()
        if vectors[key].ndim != 2:
            shape = tuple(tensor.shape)
            raise EmbeddingFileError(f"{key or 'the'} vectors have shape {shape}: expected (n, width)")
    if len({v.shape[0] for v in vectors.values()}) > 1:
        raise EmbeddingFileError(f"clip_l and clip_g hold different numbers of vectors: {_shapes(vectors)}")
    return Embedding(token, vectors)


def _shapes(vectors: dict) -> dict:
    return {k: tuple(v.shape) for k, v in vectors.items()}


def _file(path: Path) -> Path:
    if path.is_dir():
        found = [path / n for n in DIFFUSERS_NAMES if (path / n).is_file()]
        if not found:
            raise EmbeddingFileError(f"{str(path)!r} has no {' or '.join(DIFFUSERS_NAMES)}")
        path = found[0]
    if not path.is_file():
        raise EmbeddingFileError(f"{str(path)!r} does not exist")
    return path


def _load(file: Path) -> dict:
    if file.suffix == ".safetensors":
        import safetensors.torch

        try:
            return safetensors.torch.load_file(file)
        except Exception as e:  # safetensors reports a bad header as several error types
            raise EmbeddingFileError(f"{str(file)!r} is not a safetensors file ({e})") from None
    try:  # tensors, numbers and strings only: an object that would run code is refused
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EmbeddingFileError(
            f"{str(file)!r} is not an embedding torch.load(weights_only=True) can read ({str(e)[:200]}); "
            "ask for its .safetensors version"
        ) from None


def _parse(state: dict, file_name: str | None) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(the word the state names, or the file's name; its vectors by encoder key)."""
    if set(SDXL_KEYS) <= state.keys():
        return file_name, {k: state[k] for k in SDXL_KEYS}
    if "string_to_param" in state:  # A1111's .pt
        params = state["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise EmbeddingFileError("string_to_param has no '*' entry: not an A1111 embedding")
        return state.get("name") or file_name, {"": params["*"]}
    if "emb_params" in state:  # A1111's .safetensors
        return file_name, {"": state["emb_params"]}
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(state) == 1 and len(tensors) == 1:  # diffusers' {token: vectors}
        ((token, vectors),) = tensors.items()
        return token, {"": vectors}
    raise EmbeddingFileError(
        f"not an embedding format sdlite knows (keys {sorted(state)[:6]}): expected diffusers' "
        "{token: vectors}, A1111's string_to_param or emb_params, or SDXL's clip_l and clip_g"
    )
