"""An offline CLIP tokenizer.

Stable Diffusion conditions on OpenAI CLIP's byte-level BPE. A model folder normally carries its own
tokenizer files (``tokenizer/vocab.json`` and ``merges.txt``) and then we load those. For a model
built from a preset there are no files yet, and no hub to fetch them from, so we build the same
tokenizer from the BPE merge list that OpenAI published with CLIP (``bpe_simple_vocab_16e6.txt.gz``,
MIT licence, shipped in ``sdlite/assets``). The vocabulary is derived from the merges exactly as
CLIP does it, so the token ids equal those of ``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BPE_VOCAB = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP keeps the first 49152 - 256 - 2 merges of the list: 256 byte tokens, 256 byte+</w> tokens,
# the merges and 2 special tokens make the 49408-entry vocabulary of every SD 1.x/2.x text encoder.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(BPE_VOCAB, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split(" ")) for m in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m) for m in merges] + [BOS, EOS]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP's tokenizer built offline from the shipped BPE merges."""
    vocab, merges = _clip_vocab_and_merges()
    # Copies, so that no caller can change the cached vocabulary.
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=model_max_length,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )


def token_ids(tokenizer, texts) -> torch.Tensor:
    """(N, model_max_length) token ids of ``texts``, padded and truncated to the tokenizer's length: the
    text encoder's input everywhere (training, its cache, streaming, evaluation). ValueError naming
    the text for one that is not valid Unicode (see ``check_text``)."""
    texts = list(texts)
    for i, text in enumerate(texts):
        check_text(text, f"text {i} of {len(texts)}")
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def check_text(text: str, name: str) -> None:
    """ValueError naming ``name`` when ``text`` holds a lone surrogate (what Python makes of a byte that
    is not UTF-8 in an argument or a file name): the tokenizer would raise a TypeError naming nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} ({text[:40].encode('utf-8', 'backslashreplace').decode()!r}) is not valid text: "
            f"character {e.start} is a lone surrogate (a byte that is not UTF-8); pass UTF-8 text"
        ) from None
    except AttributeError:  # not a str: the tokenizer says what it wants
        pass


def load_tokenizer(path: str | Path | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """The tokenizer of a model folder (or its ``tokenizer/`` subfolder), else CLIP's built offline."""
    if path is not None:
        path = Path(path)
        for folder in (path / "tokenizer", path):
            if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
                return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return clip_tokenizer(model_max_length)
