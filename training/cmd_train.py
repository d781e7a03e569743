"""``sdlite train`` and ``sdlite train-vae``: the trainers under accelerate, from any folder.

    sdlite train --config tiny-lora                      # a shipped recipe, by name
    sdlite train --config my.yaml --max_steps 500        # a recipe of yours, a setting over it
    sdlite train --num_processes 2 --config tiny-shapes  # several processes (GPUs, or CPU processes)
    sdlite train --accelerate_config configs/accelerate/ddp.yaml --config sd15-lora
    sdlite train-vae --config tiny-vae

The same trainer as ``accelerate launch training/train.py`` (train_vae.py), started by accelerate's own
launch command inside this process (training/launch.py, which passes Ctrl-C and SIGTERM on to the trainer
and waits for its checkpoint). Before that, in this process, which imports no torch: the launcher's
flags are taken out of the command line, a recipe named by ``--config`` is found (training/named_recipes.py),
diffusers' and kohya's flags are read as sdlite's (training/foreign_flags.py, the mapping printed once),
and every setting is parsed, so that a bad flag or a missing folder is answered at once, not after the
trainer has imported its libraries. The trainer gets sdlite's own flags only.

accelerate's settings: ``--accelerate_config FILE``, else the repository's accelerate_config.yaml (one
process, the GPU if there is one), else the same settings as flags (an installed wheel);
``--num_processes N`` over either (N > 1 with the default settings runs N processes, as
``accelerate launch --multi_gpu``); mixed precision is the trainer's ``--mixed_precision``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from training import named_recipes
from training.errors import reported_errors

SCRIPTS = {"train": "train.py", "train-vae": "train_vae.py"}
LAUNCHER_FLAGS = ("accelerate_config", "num_processes", "main_process_port")
DEFAULT_ACCELERATE = Path(__file__).resolve().parents[1] / "accelerate_config.yaml"
# accelerate_config.yaml's settings as flags, where it is not beside the package (an installed wheel).
ONE_PROCESS = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no"]  # fmt: skip

LAUNCHER_HELP = """launcher options (before or among the trainer's):
  --accelerate_config FILE  accelerate's config file (default: the repository's accelerate_config.yaml:
                            one process, on the GPU if there is one)
  --num_processes N         processes to start (GPUs, or CPU processes where there is none)
  --main_process_port PORT  the port the processes meet on (several processes)
  --config NAME|FILE        a recipe: a YAML file, or a shipped recipe by name: {names}
  diffusers' and kohya's training flags are read too (--max_train_steps, --network_dim, ...)
"""


def config_class(command: str) -> type:
    if command == "train-vae":
        from training.config.vae import VAETrainConfig

        return VAETrainConfig
    from training.config.unet import TrainConfig

    return TrainConfig


def take_launcher_flags(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """({launcher flag: value}, the rest of argv): ``--name value`` or ``--name=value``."""
    options, rest, i = {}, [], 0
    while i < len(argv):
        name, eq, value = argv[i][2:].partition("=") if argv[i].startswith("--") else ("", "", "")
        if name in LAUNCHER_FLAGS:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            options[name] = value
        else:
            rest.append(argv[i])
        i += 1
    return options, rest


def accelerate_flags(options: dict[str, str]) -> list[str]:
    """accelerate launch's options for the launcher flags given."""
    processes = options.get("num_processes", "")
    if processes and (not processes.isdigit() or int(processes) < 1):
        raise ValueError(f"--num_processes {processes!r}: give a whole number >= 1")
    if "accelerate_config" in options:
        path = Path(options["accelerate_config"]).expanduser()
        if not path.is_file():
            raise ValueError(f"--accelerate_config {str(path)!r} does not exist: give accelerate's config "
                             "file (`accelerate config` writes one), or leave it out")  # fmt: skip
        flags = ["--config_file", str(path)]
    elif DEFAULT_ACCELERATE.is_file():
        flags = ["--config_file", str(DEFAULT_ACCELERATE)]
    else:
        flags = list(ONE_PROCESS if not processes else ONE_PROCESS[2:])  # --num_processes comes below
    if processes:
        flags += ["--num_processes", processes]
        if int(processes) > 1 and "accelerate_config" not in options:
            flags.append("--multi_gpu")  # the default settings are one process's; GPUs or CPU processes
    if "main_process_port" in options:
        flags += ["--main_process_port", options["main_process_port"]]
    return flags


def with_recipe(argv: list[str]) -> tuple[list[str], Path | None]:
    """argv with a recipe named by --config as its file's path, and the config file (None: none)."""
    out, config = list(argv), None
    for i, arg in enumerate(out):
        joined = arg.startswith("--config=")
        if not joined and not (arg == "--config" and i + 1 < len(out)):
            continue
        value = arg.partition("=")[2] if joined else out[i + 1]
        config = named_recipes.find(value) or Path(value)
        if joined:
            out[i] = f"--config={config}"
        else:
            out[i + 1] = str(config)
    return out, config


def prepare(command: str, argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate's options, the trainer's flags in sdlite's names); ValueError or ConfigError says what
    is wrong, every problem of the flags at once."""
    from training.checks import load_yaml
    from training.config.keys import parse_config
    from training.foreign_flags import read_as_ours, split_flags

    options, rest = take_launcher_flags(argv)
    launch = accelerate_flags(options)
    rest, recipe = with_recipe(rest)
    processes = int(options["num_processes"]) if options.get("num_processes") else None
    cls = config_class(command)
    ours = read_as_ours(cls, rest, processes=processes)
    parse_config(cls, ours)  # every setting's type, before accelerate starts
    if recipe is not None:  # parse_config has read it: it is a YAML file
        given = {name for name, _ in split_flags(ours)}
        problems = named_recipes.missing_paths(recipe, load_yaml(recipe), given)
        if problems:
            raise ValueError("\n".join(problems))
    return launch, ours


def main(command: str, argv: list[str]) -> int:
    """Run ``sdlite train`` (or train-vae) with ``argv``; returns the trainer's exit status."""
    prog = f"sdlite {command}"
    if any(arg in ("-h", "--help") for arg in argv):
        print(LAUNCHER_HELP.format(names=", ".join(named_recipes.names())))
        from training.config.keys import parse_config

        sys.argv[0] = prog
        parse_config(config_class(command), ["--help"])  # the trainer's settings; exits
    with reported_errors(prog, argv):
        launch, ours = prepare(command, argv)
    from training import launch as launcher

    script = Path(__file__).resolve().parent / SCRIPTS[command]
    return launcher.main([*launch, str(script), *ours])
