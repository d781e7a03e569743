"""Caption files beside images, sd-scripts' ``N_name`` repeat folders, and per-draw caption handling.

The layout most captioning tools write, read with no metadata file::

    train/
      10_mychar/            <- repeat these images 10 times per epoch
        0001.png  0001.txt  ("mychar, red hair, smiling")
        0002.jpg  0002.caption
      1_style/
        a.webp  a.txt

Every image below the root (recursively) is a row; its caption is the first non-empty line of the
``.txt`` (else ``.caption``) file of the same stem beside it. The repeat count of an image is N of the
nearest folder under the root named ``N_name``; other folders (and the root itself, whose name is the
user's to choose) repeat once; a count over MAX_REPEATS stops the run, naming the folder (a name such
as ``1000000000_big`` is a typo or worse). What is odd is listed, never fatal: an image without a
caption file or with an empty one trains with the empty caption; a caption file without its image is
ignored; an ``N_name`` folder with N = 0 leaves its images out; a folder whose prefix looks like a
count but is not a whole number (``1.5_x``, ``10x_x``) trains once; an image whose file or caption
file links out of the folder, or whose name is not UTF-8, is skipped (see ``caption_rows``). What is
odd about the folders and the files comes back as ``(file, problem, what was done)``, rows of
``bad_files.txt``; what is odd about a row's own caption file rides in the row (``CAPTION_PROBLEM``)
for ``clean_rows`` to list with the row's other problems, so that a row without a caption is listed
once, saying why.

Caption handling per draw (``draw_caption``), as sd-scripts users know it: ``caption_prefix`` (a
trigger word) becomes the first tag and stays first; ``shuffle_caption`` shuffles the comma-separated
tags, the first ``keep_tokens`` of the caption's own tags in place; ``caption_tag_dropout_rate`` leaves
each of the other tags out with that probability (tags are split at ``caption_separator``: a comma by
default, a space to drop single words of a sentence caption). Both are drawn from (seed, epoch, item),
so each repeat of an image gets its own caption and a resumed run draws the same.
A shuffled caption changes every draw, so its text embeddings cannot be cached (sd-scripts refuses the
same combination); the prefix alone is fixed and can be applied once when the rows are read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from sdlite.data.files import DataError, listed_file_problem, shown

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption")  # in order of preference
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.json")
_REPEATS = re.compile(r"^(\d+)_(.+)$")
_COUNT_LIKE = re.compile(r"^([^_]*\d[^_]*)_(.+)$")  # a prefix holding a digit: meant as a count?
# The most times a folder's images may repeat per epoch. Photo sets use 1 to 100; a count past this is
# a typo or a hostile name (``1000000000_x``), and every repeat is an item of each epoch's order.
MAX_REPEATS = 10_000
_CAPTION_STREAM = 0x63617074  # keeps caption draws apart from other draws seeded by (seed, ...)
# A column of caption_rows' rows: what is wrong with the row's caption file (None when nothing), listed by
# clean_rows in place of its own "no caption" (which would name the same row a second time) and removed.
CAPTION_PROBLEM = "sdlite_caption_problem"

Problem = tuple[str, str, str]  # (file, problem, what was done): a bad_files.txt row


def is_caption_folder(path: str | Path) -> bool:
    """A folder of images with caption files beside them and no metadata file: read it with
    ``caption_rows`` rather than datasets' imagefolder."""
    path = Path(path)
    if not path.is_dir() or any((path / name).is_file() for name in METADATA_FILES):
        return False
    return any(p.suffix.lower() in CAPTION_EXTENSIONS for p in path.rglob("*") if p.is_file())


def folder_repeats(name: str) -> tuple[int, str | None]:
    """The repeat count a folder's name gives (``10_mychar`` -> 10) and a problem with it, if any;
    DataError for a count over MAX_REPEATS."""
    match = _REPEATS.match(name)
    if match:
        digits = match.group(1).lstrip("0") or "0"
        if len(digits) > len(str(MAX_REPEATS)) or int(digits) > MAX_REPEATS:  # int() of 5000 digits raises
            raise DataError(
                f"folder {shown(name)!r} repeats its images {digits[:20]}{'...' if len(digits) > 20 else ''} "
                f"times, over the limit of {MAX_REPEATS}: rename it with a smaller count"
            )
        n = int(digits)
        return n, None if n > 0 else f"folder {name!r} repeats its images 0 times"
    if _COUNT_LIKE.match(name):
        return 1, f"folder {name!r}: {name.split('_')[0]!r} is not a whole repeat count"
    return 1, None  # an ordinary folder name


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _caption_of(file: Path) -> tuple[str, str | None]:
    """The caption in a caption file (its first non-empty line) and a problem with it, if any."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return "", "caption file is not UTF-8 text"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "", "empty caption file"
    return lines[0], None if len(lines) == 1 else f"caption file has {len(lines)} lines (the first is read)"


def caption_rows(
    root: str | Path,
    image_column: str = "image",
    caption_column: str = "text",
    repeats_column: str = "repeats",
    allow_outside: bool = False,
) -> tuple[datasets.Dataset, list[Problem]]:
    """The rows of a caption folder, shaped as ``load_rows``' (images undecoded, by path) with a
    ``repeats_column`` and ``CAPTION_PROBLEM``, and the problems of the folders and files (not of the rows'
    captions: clean_rows lists those). Raises DataError when no image is left to train.

    An image whose file, or caption file, may not be read (a name that is not UTF-8, a link out of the
    folder unless ``allow_outside``: ``sdlite.data.files.listed_file_problem``) stays a row marked as
    ``load_rows`` marks a bad metadata line, for clean_rows to skip and list (or, with bad_data="error",
    to stop the run), as tables do."""
    from sdlite.data.dataset import PROBLEM, WHERE

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"caption folder {str(root)!r} is not a folder")
    # Hidden files and folders (.DS_Store, .ipynb_checkpoints) are no one's training data.
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    stems = {p.with_suffix("") for p in images}
    problems: list[Problem] = []
    for p in files:
        if p.suffix.lower() in CAPTION_EXTENSIONS and p.with_suffix("") not in stems:
            problems.append((shown(p), "caption file without an image of the same name", "ignored"))

    paths, captions, repeats, caption_problems, refused = [], [], [], [], []
    for image in images:
        n, why = 1, None
        for folder in reversed(image.relative_to(root).parents[:-1]):  # nearest N_name folder wins
            count, problem = folder_repeats(folder.name)
            if _REPEATS.match(folder.name) or problem:
                n, why = count, problem
        if why and n == 0:
            problems.append((shown(image), why, "skipped (rename the folder to 1_... to train it)"))
            continue
        found = [image.with_suffix(ext) for ext in CAPTION_EXTENSIONS if image.with_suffix(ext).is_file()]
        why_not = ((shown(f), listed_file_problem(f, root, allow_outside)) for f in [image, *found[:1]])
        unreadable = next(((name, w) for name, w in why_not if w), None)
        if unreadable:  # a row of its own, which clean_rows skips and lists: nothing of it is read
            paths.append(None)
            captions.append(None)
            repeats.append(n)
            caption_problems.append(None)
            refused.append(unreadable)
            continue
        if why:
            problems.append((str(image), why, "kept, trained once per epoch"))
        text, problem = ("", "no caption file (.txt or .caption)") if not found else _caption_of(found[0])
        for extra in found[1:]:
            problems.append((str(extra), f"a second caption file beside {found[0].name}", "ignored"))
        paths.append(str(image))
        captions.append(text)
        repeats.append(n)
        caption_problems.append(problem)
        refused.append((None, None))
    if not paths:
        raise DataError(
            f"caption folder {str(root)!r} holds no image to train (of {', '.join(IMAGE_EXTENSIONS)})"
        )
    text = datasets.Value("string")
    features = datasets.Features(
        {image_column: datasets.Image(decode=False), caption_column: text,
         repeats_column: datasets.Value("int64"), CAPTION_PROBLEM: text, PROBLEM: text, WHERE: text}
    )  # fmt: skip
    entries = [{"bytes": None, "path": p} if p else None for p in paths]
    columns = {image_column: entries, caption_column: captions, repeats_column: repeats,
               CAPTION_PROBLEM: caption_problems, WHERE: [w for w, _ in refused],
               PROBLEM: [p for _, p in refused]}  # fmt: skip
    rows = datasets.Dataset.from_dict(columns, features=features)
    return rows, problems


def append_problems(report: str | Path, problems: Sequence[Problem]) -> None:
    """Add rows to a bad_files.txt report (after ``clean_rows`` wrote or removed it)."""
    if problems:
        report = Path(report)
        report.parent.mkdir(parents=True, exist_ok=True)
        with report.open("a") as f:
            f.write("".join(f"{n}\t{p}\t{a}\n" for n, p, a in problems))


def expand_repeats(repeats: Sequence[int]) -> list[int]:
    """Item -> row of an epoch in which row r appears repeats[r] times: [2, 1] -> [0, 0, 1]."""
    return [row for row, n in enumerate(repeats) for _ in range(int(n))]


@dataclass(frozen=True)
class CaptionOptions:
    """sd-scripts' caption handling (config names as theirs)."""

    shuffle_caption: bool = False  # shuffle the comma-separated tags at every draw
    keep_tokens: int = 0  # the caption's first N tags stay in place when shuffled, and are never dropped
    caption_prefix: str = ""  # a trigger word, prepended as the first tag and never moved
    separator: str = ","
    tag_dropout: float = 0.0  # sd-scripts' caption_tag_dropout_rate: each other tag left out this often

    @property
    def per_draw(self) -> bool:
        """Whether a caption changes from draw to draw (then its embeddings cannot be cached)."""
        return self.shuffle_caption or self.tag_dropout > 0


def draw_caption(caption: str, options: CaptionOptions, seed: int, epoch: int, item: int) -> str:
    """The caption as trained at one draw: a pure function of its arguments."""
    sep = options.separator
    tags = [t.strip() for t in caption.split(sep)] if caption.strip() else []
    tags = [t for t in tags if t]
    k = max(options.keep_tokens, 0)
    if options.shuffle_caption and len(tags) > k + 1:
        rng = np.random.default_rng([seed, _CAPTION_STREAM, epoch, item])
        tags = tags[:k] + [tags[k + i] for i in rng.permutation(len(tags) - k)]
    if options.tag_dropout > 0 and len(tags) > k:  # its own draw: the shuffle stays as without dropout
        u = np.random.default_rng([seed, _CAPTION_STREAM, epoch, item, 1]).random(len(tags) - k)
        tags = tags[:k] + [t for t, x in zip(tags[k:], u) if x >= options.tag_dropout]
        caption = caption if tags else ""  # every tag left out: the empty caption (or the prefix alone)
    if options.caption_prefix.strip():
        tags = [options.caption_prefix.strip(), *tags]
    joiner = f"{sep.strip()} " if sep.strip() else sep  # ", " between tags; " " between words
    return joiner.join(tags) if tags else caption.strip()


class DrawnCaptions(torch.utils.data.Dataset):
    """Examples whose caption is drawn per draw: item ``(index, flip, epoch, item)`` (from a sampler
    built with ``caption_keys=True``) -> ``examples[(index, flip)]`` with ``input_ids`` of
    ``draw_caption(captions[index], ...)``. ``tokenize``: list of captions -> (B, L) token ids."""

    def __init__(
        self,
        examples: torch.utils.data.Dataset,
        captions: Sequence[str],
        tokenize: Callable[[list[str]], torch.Tensor],
        options: CaptionOptions,
        seed: int,
    ):
        self.examples, self.captions, self.tokenize = examples, list(captions), tokenize
        self.options, self.seed = options, seed

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, key: tuple[int, bool, int, int]) -> dict[str, torch.Tensor]:
        index, flip, epoch, item = key
        example = dict(self.examples[(index, flip)])
        text = draw_caption(self.captions[index], self.options, self.seed, epoch, item)
        example.pop("embeds", None)  # a cached embedding is of the undrawn caption
        example["input_ids"] = self.tokenize([text])[0]
        return example
