"""The textual-inversion section of the U-Net trainer's config (training/textual_inversion.py reads it).

This module imports neither torch nor any model library (see training/config/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from training.checks import counts_below
from training.config.sections import Section, option


@dataclass
class TextualInversionSection(Section):
    title = "Textual inversion"
    about = (
        "(Gal et al. 2022): a new word's embedding vectors are the only trained weights; captions name the "
        "word (training/textual_inversion.py)"
    )

    textual_inversion_token: str | None = option(
        None, 'the new word, e.g. "<magenta>", added to the tokenizer(s); None: no textual inversion'
    )
    textual_inversion_init: str = option("*", "the text whose mean token embedding starts the vectors")
    textual_inversion_vectors: int = option(1, "vectors (tokens) of the word")

    def problems(self) -> list[str]:
        token = self.textual_inversion_token
        problems = counts_below(self, 1, "textual_inversion_vectors")
        if token is not None and (not token.strip() or token != token.strip() or " " in token):
            problems.append(f"textual_inversion_token={token!r}: one word without spaces, e.g. <magenta>")
        return problems
