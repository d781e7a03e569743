"""The flags people already have: diffusers' and kohya's training flags read as sdlite's settings.

    accelerate launch training/train.py --pretrained_model_name_or_path=runs/demo/model --lora true \
        --train_data_dir=photos --resolution=512 --random_flip --max_train_steps=500 --rank 8 \
        --validation_prompt="a photo of mystar, a small orange star"

``read_as_ours(cls, argv)`` rewrites a command line of diffusers' example scripts (text_to_image,
text_to_image_lora, their SDXL twins, dreambooth_lora) or of kohya's ``train_network.py`` into sdlite's
own flags before they are parsed, so that the one parser (training/config/keys.py) sees only ours:

- a renamed flag keeps its value (``--max_train_steps`` -> ``--max_steps``);
- their switches take no value (``--center_crop``, ``--random_flip``, ``--use_ema``, ``--enable_bucket``);
- a few need their value read (``--network_dim`` turns LoRA on, ``--resolution 512,512``, epochs);
- a flag with no equivalent is refused naming what to use, and one whose behaviour sdlite lacks yet
  (``--clip_skip``) says so rather than being ignored.

Every problem of the command line is found in one pass and reported together, in one line, before
anything is imported or built. What was renamed is printed once, in one line, and so is each way
sdlite behaves differently from the tool the flag came from (steps instead of epochs, exact resume).

Prompts: a value of ``--validation_prompt`` (diffusers) is one prompt, and so is each value of
``--validation_prompts`` (give several after it, or repeat it): commas stay inside a prompt, as kohya's
captions are comma lists. A YAML list (``'["a", "b"]'``) still reads as a list.

This module imports neither torch nor any model library.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from training import epochs, kohya_dataset
from training.errors import is_main_process
from training.foreign_names import (
    DIFFUSERS_ONLY,
    LORA_MODULES,
    NOTES,
    REFUSED,
    RENAMED,
    SAFE_FORMATS,
    SWITCHES,
)

BOOLEANS = ("true", "false", "1", "0", "yes", "no", "on", "off")
PROMPT_LISTS = ("validation_prompts",)  # list keys whose every flag value is one item
OWN = ("config", "debug", "help")  # flags of the parser itself


@dataclasses.dataclass
class Reading:
    """What one pass over a command line found: our flags, the renamings, notes and problems."""

    fields: dict[str, dataclasses.Field]
    yaml: dict[str, Any]
    legacy: Callable[[str], str | None]  # the config class's own refusal of a foreign flag, if any
    argv: list[str] = dataclasses.field(default_factory=list)
    later: list[str] = dataclasses.field(default_factory=list)  # flags that must come after argv's
    prompts: list[str] | None = None
    unet_lr: str | None = None
    processes: int = 1
    subset_repeats: int = 1  # a kohya dataset config's lone subset's num_repeats (for epochs)
    renamed: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def set(self, key: str, value: str, theirs: str, shown: str | None = None) -> None:
        """Our ``--key=value`` for their flag ``theirs``; a key this trainer lacks is a problem."""
        if key not in self.fields:
            self.problems.append(
                self.legacy(theirs) or f"--{theirs} is read as --{key}, which this trainer does not take"
            )
            return
        self.argv.append(f"--{key}={value}")
        self.renamed.append(f"--{theirs} -> --{key}" + (f" {shown}" if shown is not None else ""))

    def note(self, name: str) -> None:
        if name in NOTES and NOTES[name] not in self.notes:
            self.notes.append(NOTES[name])

    def setting(self, key: str) -> Any:
        """The value a key will have: the last one this command line gives, else the YAML's, else the
        default (for working out epochs and folders)."""
        for arg in reversed(self.argv):
            name, _, value = arg[2:].partition("=")
            if name == key:
                return value
        if key in self.yaml:
            return self.yaml[key]
        f = self.fields.get(key)
        return None if f is None or f.default is dataclasses.MISSING else f.default


def split_flags(argv: list[str]) -> list[tuple[str, list[str]]]:
    """``[(name, values)]`` of a command line: each ``--name`` with the values that follow it (``--a=b``
    is ``a`` with ``[b]``); a value before any flag has the name ``""``."""
    items: list[tuple[str, list[str]]] = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            items.append((name, [value] if eq else []))
        elif arg in ("-h",):
            items.append(("help", []))
        elif items:
            items[-1][1].append(arg)
        else:
            items.append(("", [arg]))
    return items


def read_as_ours(cls: type, argv: list[str], processes: int | None = None, out=None) -> list[str]:
    """argv in sdlite's flags only, the renamings and notes printed once (to ``out``, stderr by default);
    ValueError lists every problem of the command line, separated by "; ". ``processes`` (default:
    $WORLD_SIZE, else 1) is what an epoch is divided among."""
    from training.checks import ConfigError, load_yaml
    from training.config.keys import foreign_flag, keys

    fields = {name: key.field for name, key in keys(cls).items()}
    items = split_flags(argv)
    config = [values[-1] for name, values in items if name == "config" and values]
    try:
        yaml = load_yaml(config[-1]) if config else {}
    except ConfigError:
        yaml = {}  # the parser reads it again and says what is wrong with it
    legacy = lambda n: foreign_flag(cls, n)  # the config class's own table of flags it refuses
    world = processes or int(os.environ.get("WORLD_SIZE", "1") or 1)
    reading = Reading(fields, yaml, legacy, processes=world)
    for name, values in items:  # the data set config first: the command line's own flags override it
        if name == "dataset_config":
            if len(values) != 1:
                reading.problems.append("--dataset_config takes one file")
                continue
            found, problems, reading.subset_repeats = kohya_dataset.read(values[0])
            reading.problems += problems
            reading.renamed.append(f"--dataset_config {values[0]} (as flags)")
            for key, value in found:
                _read(reading, key, value)
    for name, values in items:  # then the flags, those read in the light of others last
        if name != "dataset_config" and name not in DEPENDENT:
            _read(reading, name, values)
    for name, values in items:
        if name in DEPENDENT:
            _read(reading, name, values)
    _finish(reading)
    if reading.problems:
        raise ValueError("; ".join(reading.problems))
    if reading.renamed and is_main_process():
        out = out or sys.stderr
        print(f"diffusers/kohya flags read as sdlite's: {', '.join(reading.renamed)}", file=out)
        for note in reading.notes:
            print(f"note: {note}", file=out)
    return reading.argv + reading.later


def _read(reading: Reading, name: str, values: list[str]) -> None:
    """Our flags for one ``--name values`` of the command line, into ``reading``."""
    f = reading.fields.get(name)
    if name in PROMPT_LISTS or name == "validation_prompt":
        _prompts(reading, name, values)
    elif name in OWN or name == "" or (f is not None and name not in SPECIAL_OURS):
        if f is not None and f.type in ("bool", bool) and not values:
            reading.argv.append(f"--{name}=true")  # their switch: on when given
        elif len(values) == 1:
            reading.argv.append(f"--{name}={values[0]}")  # "=": a value such as -1e-4 is not a flag
        else:
            reading.argv += [f"--{name}", *values] if name else values
        reading.note(name)
    elif (handler := SPECIAL.get(name)) is not None:
        handler(reading, name, values)
    elif name in RENAMED:
        if len(values) != 1:
            reading.problems.append(f"--{name} takes one value")
        else:
            reading.set(RENAMED[name], values[0], name)
    elif name in SWITCHES:
        if values and values[0].lower() not in BOOLEANS:
            reading.problems.append(f"--{name} is a switch: it takes no value")
        elif not values or values[0].lower() in ("true", "1", "yes", "on"):
            for key, value in SWITCHES[name].items():
                reading.set(key, value, name, shown=value)
            if not SWITCHES[name]:
                reading.renamed.append(f"--{name} (what sdlite does anyway)")
        reading.note(name)
    elif name in REFUSED:
        reading.problems.append(f"--{name}: {REFUSED[name]}")
    elif (message := reading.legacy(name)) is not None:
        reading.problems.append(message)
    else:
        close = difflib.get_close_matches(name, list(reading.fields), n=1)
        hint = f" (did you mean --{close[0]}?)" if close else " (see --help)"
        reading.problems.append(f"--{name} is not a setting of this trainer{hint}")


def _prompts(reading: Reading, name: str, values: list[str]) -> None:
    """Each value one prompt; a value written as a YAML list ``[...]`` its items."""
    from training.checks import ConfigError, safe_yaml

    prompts = reading.prompts if reading.prompts is not None else []
    for value in values:
        if value.strip().startswith("["):
            try:
                items = safe_yaml(value)
            except ConfigError as e:
                reading.problems.append(f"--{name}: {e}")
                continue
            prompts += [str(item) for item in items] if isinstance(items, list) else [value]
        else:
            prompts.append(value)
    if not values:
        reading.problems.append(f"--{name} needs a prompt")
    if "validation_prompts" not in reading.fields:
        reading.problems.append(f"--{name}: this trainer draws no validation images")
    reading.prompts = prompts
    if name == "validation_prompt":
        reading.renamed.append("--validation_prompt -> --validation_prompts (one prompt)")


def _finish(reading: Reading) -> None:
    """What depends on the whole command line: the prompt list, kohya's learning rates, with_prior."""
    if reading.prompts is not None and "validation_prompts" in reading.fields:
        reading.later.append(f"--validation_prompts={json.dumps(reading.prompts)}")
    if reading.unet_lr is not None:  # kohya's --learning_rate then stays the text encoder's rate
        given = any(arg.startswith("--learning_rate=") for arg in reading.argv)
        if given and reading.setting("text_encoder_lr") is None:
            reading.later.append(f"--text_encoder_lr={reading.setting('learning_rate')}")
        reading.later.append(f"--learning_rate={reading.unet_lr}")
    theirs = {r.split()[0].removeprefix("--") for r in reading.renamed}
    if "with_prior_preservation" in theirs and not reading.setting("class_data_dir"):
        reading.problems.append("--with_prior_preservation needs --class_data_dir (and --class_prompt)")
    crop = any(arg.startswith(("--random_crop=", "--center_crop")) for arg in reading.argv)
    if theirs & DIFFUSERS_ONLY and "center_crop" not in theirs and not crop:
        reading.note("diffusers_crop")


# ---- flags whose value is read -------------------------------------------------------------------


def _one(reading: Reading, name: str, values: list[str]) -> str | None:
    if len(values) != 1:
        reading.problems.append(f"--{name} takes one value")
        return None
    return values[0]


def _network_dim(reading: Reading, name: str, values: list[str]) -> None:
    if (value := _one(reading, name, values)) is not None:
        reading.set("lora_rank", value, name)
        reading.set("lora", "true", name, shown="true")
        reading.renamed[-2:] = ["--network_dim -> --lora_rank (and --lora true)"]
        reading.note(name)


def _network_module(reading: Reading, name: str, values: list[str]) -> None:
    if (value := _one(reading, name, values)) is None:
        return
    if value not in LORA_MODULES:
        reading.problems.append(
            f"--network_module {value}: sdlite trains networks.lora (LoRA); for LyCORIS' LoHa or LoKr give "
            "--lora true --lora_type loha (or lokr), for DoRA --lora_dora true"
        )
    else:
        reading.set("lora", "true", name, shown="true")


def _save_model_as(reading: Reading, name: str, values: list[str]) -> None:
    if (value := _one(reading, name, values)) is None:
        return
    if value not in SAFE_FORMATS:
        reading.problems.append(
            f"--save_model_as {value}: sdlite writes safetensors only (a pickled .{value} can run code "
            "when loaded): use safetensors"
        )
    else:
        reading.set("lora_save_format", SAFE_FORMATS[value], name, shown=SAFE_FORMATS[value])


def _resolution(reading: Reading, name: str, values: list[str]) -> None:
    """kohya's ``W,H`` (or diffusers' one side): sdlite trains squares of one side (buckets of about
    side² pixels), so W,H is read only when W = H."""
    if (value := _one(reading, name, values)) is None:
        return
    sides = [side.strip() for side in value.split(",")]
    if len(sides) == 2 and sides[0] == sides[1]:
        reading.set("resolution", sides[0], name, shown=None)
        reading.renamed[-1] = f"--resolution {value} -> --resolution {sides[0]}"
    elif len(sides) == 2:
        reading.problems.append(
            f"--resolution {value}: sdlite trains at one side (--resolution N; with --aspect_buckets "
            "true, buckets of about N² pixels): give one number"
        )
    else:
        reading.argv.append(f"--resolution={value}")


def _caption_extension(reading: Reading, name: str, values: list[str]) -> None:
    if (value := _one(reading, name, values)) is None:
        return
    if value not in (".txt", ".caption"):
        reading.problems.append(f"--caption_extension {value}: sdlite reads a .txt (else .caption) beside "
                                "each image: rename the caption files")  # fmt: skip
    else:
        reading.renamed.append(f"--caption_extension {value} (read as it is)")


def _output_name(reading: Reading, name: str, values: list[str]) -> None:
    if (value := _one(reading, name, values)) is not None:
        folder = os.path.join(str(reading.setting("output_dir")), value)
        reading.later.append(f"--final_dir={folder}")
        reading.renamed.append(f"--output_name {value} -> --final_dir {folder}")


def _resume_from_checkpoint(reading: Reading, name: str, values: list[str]) -> None:
    """diffusers' value is "latest" or a checkpoint folder's name in output_dir; sdlite's a path."""
    if (value := _one(reading, name, values)) is None:
        return
    folder = value
    if value != "latest" and os.sep not in value and not os.path.isdir(value):
        folder = os.path.join(str(reading.setting("output_dir")), value)
    reading.set("resume", folder, name, shown=None if folder == value else folder)
    reading.note(name)


def _train_text_encoder(reading: Reading, name: str, values: list[str]) -> None:
    """diffusers' LoRA scripts' switch means the text encoder's adapter; the full scripts' the weights."""
    if values and values[0].lower() not in BOOLEANS:
        reading.problems.append(f"--{name} is a switch: it takes no value")
        return
    value = values[0] if values else "true"
    lora = str(reading.setting("lora")).lower() in ("true", "1", "yes", "on")
    if lora and not values:
        reading.set("lora_text_encoder", value, name, shown=value)
    else:
        reading.argv.append(f"--train_text_encoder={value}")


def _unet_lr(reading: Reading, name: str, values: list[str]) -> None:
    """kohya's --unet_lr wins over its --learning_rate, which then remains the text encoder's rate."""
    if (value := _one(reading, name, values)) is not None:
        reading.unet_lr = value
        reading.renamed.append("--unet_lr -> --learning_rate")


def _optimizer_type(reading: Reading, name: str, values: list[str]) -> None:
    if (value := _one(reading, name, values)) is None:
        return
    if value.lower() == "adamw":
        reading.renamed.append("--optimizer_type AdamW (sdlite's)")
    elif value.lower() == "adamw8bit":
        reading.set("use_8bit_adam", "true", name, shown="true")
    else:
        reading.problems.append(
            f"--optimizer_type {value}: sdlite trains with AdamW (or --use_8bit_adam true)"
        )


def _epochs(reading: Reading, name: str, values: list[str]) -> None:
    """Epochs as optimizer steps, where the data's size is known from its folder alone."""
    if (value := _one(reading, name, values)) is None:
        return
    key = "validation_every" if name == "validation_epochs" else "max_steps"
    if any(arg.startswith(f"--{key}=") for arg in reading.argv):  # as in their scripts, steps win
        reading.renamed.append(f"--{name} {value} (--{key} given: steps win)")
        return
    steps, why = epochs.steps_for(value, reading.setting, reading.processes, reading.subset_repeats)
    if steps is None:
        reading.problems.append(f"--{name}: sdlite counts optimizer steps: give --{key} ({why})")
    else:
        reading.set(key, str(steps), name, shown=None)
        reading.renamed[-1] = f"--{name} {value} -> --{key} {steps} ({why})"
        reading.note(name)


SPECIAL: dict[str, Callable[[Reading, str, list[str]], None]] = {
    "network_dim": _network_dim,
    "network_module": _network_module,
    "save_model_as": _save_model_as,
    "resolution": _resolution,
    "caption_extension": _caption_extension,
    "output_name": _output_name,
    "resume_from_checkpoint": _resume_from_checkpoint,
    "train_text_encoder": _train_text_encoder,
    "unet_lr": _unet_lr,
    "optimizer_type": _optimizer_type,
    "num_train_epochs": _epochs,
    "max_train_epochs": _epochs,
    "validation_epochs": _epochs,
}
SPECIAL_OURS = ("resolution", "train_text_encoder")  # our flags that also read their values
# Read after the others: they depend on the data, the batch, the output folder or --lora.
DEPENDENT = ("num_train_epochs", "max_train_epochs", "validation_epochs", "output_name", "train_text_encoder",
             "resume_from_checkpoint")  # fmt: skip
