"""Issue 33, item 2 and "how we know": every setting is checked at start-up, before a model is built,
data read or a cache filled, every problem at once, one line each naming the key and the fix; and the
training scripts end such an error with that line and exit status 2, not a traceback (--debug or
SDLITE_DEBUG=1 shows it), printed once under a two-process accelerate launch.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training import errors
from training.checks import _base_type
from training.config import ConfigError, VAETrainConfig, from_dict, keys, parse_config
from training.config.lora import LORA_KEYS
from training.config.unet import TrainConfig
from training.train import main
from training.train_vae import main as train_vae

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture
def nothing_built(monkeypatch):
    """The model builders of both trainers fail the test if called: a check must come before them."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the settings were checked")

    monkeypatch.setattr("training.family.StableDiffusion.load", built)
    monkeypatch.setattr("training.train_vae.build_vae", built)


def argv(tmp_path, **values) -> list[str]:
    values = dict(output_dir=tmp_path / "run", report_to="none", **values)
    return [f"--{key}={value}" for key, value in values.items()]  # "=": argparse reads -1e-4 as a flag


# (key, value): each one passed the old start-up check and failed only when first used, or never.
UNET_SETTINGS = [
    ("validation_guidance", "nan"), ("validation_guidance", "inf"), ("validation_guidance", "-1"),
    ("validation_inference_steps", "0"), ("validation_inference_steps", "-3"),
    ("validation_inference_steps", "1001"),
    ("learning_rate", "nan"), ("learning_rate", "inf"), ("learning_rate", "0"), ("learning_rate", "-1e-4"),
    ("seed", str(2**70)), ("seed", "-1"), ("seed", str(2**32)),
    ("dataloader_num_workers", "-1"),
    ("adam_beta1", "1"), ("adam_beta2", "nan"), ("adam_epsilon", "0"), ("adam_weight_decay", "-0.1"),
    ("max_grad_norm", "nan"), ("lr_warmup_steps", "-1"), ("lr_scheduler", "cosinee"),
    ("checkpoint_every", "-1"), ("checkpoints_total_limit", "0"), ("checkpoints_total_limit", "-2"),
    ("resolution", "-32"), ("ema_decay", "1"), ("ema_decay", "nan"), ("snr_gamma", "0"),
    ("noise_offset", "inf"), ("prior_loss_weight", "nan"), ("lora_alpha", "0"), ("text_encoder_lr", "inf"),
    ("shuffle_buffer", "0"), ("val_count", "0"), ("val_timesteps", "100,1000"), ("validation_every", "-1"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), UNET_SETTINGS)
def test_a_bad_setting_is_refused_before_the_model_is_built_naming_it(key, value, tmp_path, nothing_built):
    lora = dict(lora="true", lora_from_scratch="true") if key in LORA_KEYS else {}  # read with lora only
    with pytest.raises(ConfigError, match=f"^bad training config: {key}=.*: use ") as refused:
        main(argv(tmp_path, **{key: value}, **lora))
    assert len(str(refused.value).splitlines()) == 1
    assert not (tmp_path / "run").exists()  # not even the run folder was made


@pytest.mark.parametrize(
    ("prompts", "expected"),
    [
        (["a red circle", "  ", "a blue square"], r"validation_prompts item\(s\) \[2\] empty"),
        (
            ["a red circle", "a \udcff square"],
            r"validation_prompts item 2: character 2, '\\udcff', is a byte that is not UTF-8",
        ),
    ],
)
def test_validation_prompts_that_are_not_text_are_refused_before_the_model(
    prompts, expected, tmp_path, nothing_built
):
    with pytest.raises(ConfigError, match=expected):
        main([*argv(tmp_path), "--validation_prompts", *prompts])  # each value one prompt


def test_prompt_keys_read_from_a_command_line_that_is_not_utf8_are_refused(tmp_path, nothing_built):
    bad = b"a photo of sks \xff dog".decode("utf-8", "surrogateescape")  # how Python reads such an argv
    with pytest.raises(ConfigError) as refused:
        main(argv(tmp_path, instance_prompt=bad, class_prompt=bad, caption_prefix=bad))
    assert [line.split(":")[1].strip() for line in str(refused.value).splitlines()] == [
        "instance_prompt", "class_prompt", "caption_prefix"
    ]  # fmt: skip


def test_a_prompts_file_seed_no_generator_takes_is_refused_naming_its_line(tmp_path, nothing_built):
    path = tmp_path / "prompts.txt"
    path.write_text(f"a red circle --d 7\na blue square --d {2**70}\n")
    with pytest.raises(
        ConfigError, match=r"prompts.txt', line 2: --d '1180591620717411303424' is not a whole"
    ):
        main(argv(tmp_path, validation_prompts_file=path))


@pytest.mark.parametrize(
    ("key", "value"),
    [("kl_weight", "nan"), ("eval_count", "0"), ("scale_count", "0"), ("eval_every", "-1"),
     ("learning_rate", "inf"), ("seed", str(2**64)), ("max_grad_norm", "-1"), ("edge_weight", "-1")],
)  # fmt: skip
def test_a_bad_vae_setting_is_refused_before_the_vae_is_built(key, value, tmp_path, nothing_built):
    with pytest.raises(ConfigError, match=f"^bad training config: {key}=.*: use "):
        train_vae(argv(tmp_path, **{key: value}))
    assert not (tmp_path / "run").exists()


def numeric_fields(cls) -> list[tuple[str, object]]:
    """(field, a value no field of its type means: NaN for a number, -1 for a count, [-1] for a list)."""
    bad = {(float, False): float("nan"), (int, False): -1, (int, True): [-1]}
    kinds = {name: _base_type(key.annotation) for name, key in keys(cls).items()}
    return [(name, bad[kinds[name]]) for name in keys(cls) if kinds[name] in bad]


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    [(cls, name, value) for cls in (TrainConfig, VAETrainConfig) for name, value in numeric_fields(cls)],
)
def test_every_numeric_field_refuses_nan_or_a_negative_naming_itself(cls, name, value):
    lora = {"lora": True} if cls is TrainConfig else {}  # the LoRA keys are read
    cfg = from_dict(cls, {name: value, **lora})
    assert any(name in problem for problem in cfg.problems()), name


def test_every_problem_is_reported_at_once_one_line_each_naming_its_key():
    cfg = parse_config(TrainConfig, ["--learning_rate", "nan", "--seed", "-1", "--validation_guidance", "inf",
                                     "--dataloader_num_workers", "-1", "--max_steps", "0"])  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        cfg.check()
    lines = str(refused.value).splitlines()
    keys = [line.removeprefix("bad training config: ").split("=")[0] for line in lines]
    assert sorted(keys) == sorted(["learning_rate", "seed", "validation_guidance", "dataloader_num_workers",
                                   "max_steps"])  # fmt: skip
    assert "learning_rate=nan: use a finite number > 0 (default 0.0001)" in lines[keys.index("learning_rate")]
    assert "seed=-1: use a whole number from 0 to 4294967295 (default 0)" in lines[keys.index("seed")]


def test_the_defaults_and_edges_of_each_range_are_accepted():
    TrainConfig().check()
    VAETrainConfig().check()
    edges = dict(seed=2**32 - 1, validation_inference_steps=1000, validation_guidance=0.0, ema_decay=0.0,
                 adam_beta1=0.0, checkpoint_every=0, checkpoints_total_limit=None, val_timesteps=[0, 999],
                 resolution=None, snr_gamma=None)  # fmt: skip
    edges = from_dict(TrainConfig, edges)
    edges.check()


# ---- the scripts' one line ------------------------------------------------------------------------------


def run_script(args: list[str], launcher: list[str] | None = None, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != errors.DEBUG_ENV}
    environment.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), **env)
    command = [*(launcher or [sys.executable]), *args]
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("script", "key"), [("train.py", "validation_guidance"), ("train_vae.py", "kl_weight")]
)
def test_the_script_ends_a_bad_setting_with_one_line_and_status_2(script, key, tmp_path):
    done = run_script([f"training/{script}", *argv(tmp_path, **{key: "nan"})])
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        f"{script}: error: bad training config: {key}=nan: use a finite number >= 0 "
        f"(default {'7.5' if key == 'validation_guidance' else '1e-06'})"
    ]
    assert not (tmp_path / "run").exists()


def test_the_debug_flag_shows_the_traceback(tmp_path):
    done = run_script(["training/train.py", *argv(tmp_path, learning_rate="nan"), "--debug"])
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ConfigError: bad training config: learning_rate=nan" in done.stderr


def test_a_bad_data_folder_ends_the_script_with_one_line(tmp_path):
    missing = tmp_path / "no-such-data"
    done = run_script(["training/train.py", *argv(tmp_path, train_data_dir=missing, max_steps=1)])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert str(missing) in line


def test_under_a_two_process_launch_the_line_is_printed_once(tmp_path):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    options = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", free_port()]  # fmt: skip
    launcher = [accelerate, "launch", *options]
    done = run_script(["training/train.py", *argv(tmp_path, learning_rate="nan")], launcher=launcher)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert output.count("train.py: error: bad training config: learning_rate=nan") == 1, output[-3000:]
    assert "ConfigError" not in output  # no trainer's traceback (torchrun's agent prints its own summary)


# ---- which errors are ours ----------------------------------------------------------------------------


def raised(function, *args) -> BaseException:
    try:
        function(*args)
    except BaseException as e:  # noqa: BLE001 (the test looks at what it is)
        return e
    raise AssertionError("nothing was raised")


def test_errors_raised_on_purpose_are_ours_and_the_rest_keep_their_traceback():
    from sdlite.presets import get_preset

    assert errors.is_ours(ConfigError("x"))
    assert errors.is_ours(raised(get_preset, "no-such-preset"))  # a plain ValueError of a `raise` of ours
    assert not errors.is_ours(raised(int, "x"))  # Python's own ValueError
    assert not errors.is_ours(raised(lambda: [][1]))  # a bug: IndexError
    assert not errors.is_ours(KeyboardInterrupt())


def test_reported_errors_exits_2_with_the_line_only_for_ours(capsys, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as ended, errors.reported_errors("train.py", argv=[]):
        raise ConfigError(
            "bad training config: seed=-1: use 0 to 4294967295\nbad training config: x=1: use 2"
        )
    assert ended.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "train.py: error: bad training config: seed=-1: use 0 to 4294967295",
        "train.py: error: bad training config: x=1: use 2",
    ]
    with pytest.raises(ZeroDivisionError), errors.reported_errors("train.py", argv=[]):
        1 / 0  # noqa: B018
    with pytest.raises(ConfigError), errors.reported_errors("train.py", argv=["--debug"]):
        raise ConfigError("shown with its traceback")
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(ConfigError), errors.reported_errors("train.py", argv=[]):
        raise ConfigError("shown with its traceback")
    monkeypatch.delenv(errors.DEBUG_ENV)
    monkeypatch.setenv("RANK", "1")  # another process of a launch: quiet, the same status
    with pytest.raises(SystemExit) as ended, errors.reported_errors("train.py", argv=[]):
        raise ConfigError("printed by rank 0 only")
    assert ended.value.code == 2 and capsys.readouterr().err == ""


def test_an_error_of_a_dataloader_worker_is_its_own_last_line():
    from torch.utils.data import DataLoader

    from sdlite.data.files import DataError

    class Broken:
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise DataError("image 'a.png' is not an image: remove it or set bad_data skip")

    error = raised(lambda: next(iter(DataLoader(Broken(), num_workers=1))))
    assert isinstance(error, DataError) and "Original Traceback" in str(error)  # as torch re-raises it
    assert errors.one_line("train.py", error) == (
        "train.py: error: image 'a.png' is not an image: remove it or set bad_data skip"
    )
