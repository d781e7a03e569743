"""Sample prompts for the images a training run draws as it goes: the ``validation_prompts`` list and a
prompts file in the format of kohya's sd-scripts (its ``--sample_prompts``).

A prompts file holds one prompt a line; blank lines and lines starting with ``#`` are skipped. A line
may end with options, each a space, two dashes, a letter and its value (sd-scripts' names):

    a red circle, studio light --n blurry, dark --s 30 --l 4.5 --d 7 --w 64 --h 32

    --n text   the negative prompt          --s N   sampling steps (1 to 1000)
    --l x      classifier-free guidance     --d N   the seed (0 to 2**32 - 1)
    --w N      width in pixels              --h N   height in pixels (multiples of 8)

An option left out takes the run's value: validation_inference_steps, validation_guidance, the model's
size, and seed + the prompt's place in the list. Unlike sd-scripts, which passes over what it cannot
read, a file with an unknown option, a bad number or no prompt at all is refused at start-up
(TrainConfig.problems), naming the file and the line, before anything is trained: a typo found only at
the first sample, hours in, would cost the run its samples.

This module imports neither torch nor any model library (training/config/unet.py calls it for ``--help``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from training.checks import SEEDS

# sd-scripts' options we read: letter -> (SamplePrompt field, what its value must be).
OPTIONS = {
    "n": ("negative_prompt", "text"),
    "s": ("steps", "a whole number of sampling steps from 1 to 1000"),
    "l": ("guidance", "a guidance scale >= 0, e.g. 4.5"),
    "d": ("seed", f"a whole number >= 0 and <= {SEEDS[-1]}"),
    "w": ("width", "a width in pixels, a multiple of 8"),
    "h": ("height", "a height in pixels, a multiple of 8"),
}
# sd-scripts' options that have no meaning here, and why.
FOREIGN = {
    "ss": "the sampler: sdlite samples with the run's own scheduler",
    "cn": "a ControlNet image: sdlite trains no ControlNet",
    "f": "a frame count: sdlite makes still images",
}


class PromptFileError(ValueError):
    """A prompts file that cannot be used: missing, empty, or a line with a bad option."""


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to draw: the prompt and its options (None: the run's value)."""

    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None


def _value(letter: str, text: str) -> str | int | float:
    """The option's value converted and checked; ValueError says what it must be."""
    if letter == "n":
        return text
    if letter == "l":
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise ValueError
        return value
    if not re.fullmatch(r"\d+", text):
        raise ValueError
    value = int(text)
    if (letter == "s" and not 1 <= value <= 1000) or (letter in "wh" and (value < 8 or value % 8)):
        raise ValueError
    if letter == "d" and value not in SEEDS:  # the run's seeds' range: torch refuses 2**64 and more
        raise ValueError
    return value


def parse_line(line: str, where: str = "prompt") -> SamplePrompt:
    """A SamplePrompt from one line: the prompt, then its ``--x value`` options (see module docstring).
    ``where`` ("prompts.txt, line 3") starts any error's message."""
    # An option starts at whitespace + "--" + a non-space; " " first so that a line may open with one.
    prompt, *options = re.split(r"\s+--(?=\S)", " " + line.strip())
    values: dict[str, str | int | float] = {}
    for option in options:
        letter, text = (option.split(None, 1) + [""])[:2]  # "n blurry, dark" -> "n", "blurry, dark"
        letter, text = letter.lower(), text.strip()
        if letter in FOREIGN:
            raise PromptFileError(
                f"{where}: --{letter} is sd-scripts' option for {FOREIGN[letter]}; remove it"
            )
        if letter not in OPTIONS:
            raise PromptFileError(
                f"{where}: unknown option --{letter}; a line takes "
                + ", ".join(f"--{k} ({field})" for k, (field, _) in OPTIONS.items())
            )
        name, must_be = OPTIONS[letter]
        if name in values:
            raise PromptFileError(f"{where}: --{letter} is given twice; keep one")
        if not text:
            raise PromptFileError(f"{where}: --{letter} has no value; give {must_be}")
        try:
            values[name] = _value(letter, text)
        except ValueError:
            raise PromptFileError(f"{where}: --{letter} {text!r} is not {must_be}") from None
    return SamplePrompt(prompt.strip(), **values)


def read_prompts_file(path: str | Path) -> list[SamplePrompt]:
    """The prompts of a file, in order; PromptFileError names the file (and line) of any problem."""
    path = Path(path).expanduser()
    if path.suffix.lower() in (".toml", ".json"):
        raise PromptFileError(
            f"prompts file {str(path)!r}: sdlite reads sd-scripts' text format only, one prompt a line "
            "with --n/--s/--l/--d/--w/--h options; write the prompts in a .txt file"
        )
    if not path.is_file():
        raise PromptFileError(
            f"prompts file {str(path)!r} does not exist: give a text file, one prompt a line"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        where = f"{e.reason} at byte {e.start}"
        raise PromptFileError(f"prompts file {str(path)!r} is not UTF-8 text ({where})") from None
    prompts = [
        parse_line(line, f"prompts file {str(path)!r}, line {number}")
        for number, line in enumerate(lines, start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise PromptFileError(
            f"prompts file {str(path)!r} holds no prompt (only blank lines and # comments): "
            "write one prompt a line"
        )
    return prompts


def run_prompts(validation_prompts: list[str], prompts_file: str | None) -> list[SamplePrompt]:
    """A run's sample prompts: those of validation_prompts, then those of the prompts file."""
    listed = [SamplePrompt(p) for p in validation_prompts]
    return listed + (read_prompts_file(prompts_file) if prompts_file else [])


def sample_batches(
    prompts: list[SamplePrompt], seed: int, steps: int, guidance: float
) -> list[tuple[list[int], dict]]:
    """The pipeline calls that draw ``prompts``: [(the prompts' places in the list, the call's arguments)],
    one call per (steps, guidance, width, height), so that the prompts sharing them sample as a batch.
    The arguments are the pipeline's (prompt, negative_prompt, num_inference_steps, guidance_scale,
    width, height; a size of None is the model's) and ``seeds``, one a prompt: its --d, else seed + its
    place. ``steps`` and ``guidance`` are the run's, for the prompts that set none."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        key = (p.steps or steps, guidance if p.guidance is None else p.guidance, p.width, p.height)
        groups.setdefault(key, []).append(i)
    calls = []
    for (n, scale, width, height), places in groups.items():
        chosen = [prompts[i] for i in places]
        call = dict(
            prompt=[p.prompt for p in chosen],
            negative_prompt=[p.negative_prompt or "" for p in chosen],  # "": the pipeline's default
            num_inference_steps=n,
            guidance_scale=scale,
            width=width,
            height=height,
            seeds=[seed + i if p.seed is None else p.seed for i, p in zip(places, chosen)],
        )
        calls.append((places, call))
    return calls


def prompts_file_problems(prompts_file: str | None) -> list[str]:
    """What is wrong with a prompts file, in words (TrainConfig.problems); empty when it reads."""
    try:
        run_prompts([], prompts_file)
    except PromptFileError as e:
        return [str(e)]
    return []


def save_samples(images: list, folder: str | Path, step: int):
    """Write ``folder/step-N/NN.png`` (one per prompt, in order) and their grid ``folder/step-N.png``
    (at most 8 a row; images of other sizes each in a cell of the largest, on white); returns the grid."""
    from PIL import Image

    from sdlite.images import grid

    folder = Path(folder) / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
    w, h = max(im.width for im in images), max(im.height for im in images)
    cells = []
    for image in images:
        cell = Image.new("RGB", (w, h), (255, 255, 255))
        cell.paste(image.convert("RGB"), ((w - image.width) // 2, (h - image.height) // 2))
        cells.append(cell)
    sheet = grid(cells, rows=math.ceil(len(cells) / 8))
    sheet.save(folder.with_suffix(".png"))
    return sheet
