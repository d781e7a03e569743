import time
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from training.config import ConfigError, field_docs, parse_config, save_yaml


@dataclass
class Example:
    """An example entry point."""

    name: str = "run"
    steps: int = 10
    rate: float = 1e-4
    flag: bool = False
    path: str | None = None
    gamma: float | None = None
    prompts: list[str] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=lambda: [100, 500])


def test_defaults_come_from_the_dataclass():
    assert parse_config(Example, []) == Example()


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\nrate: 3.0e-4\nflag: true\nprompts: [a red circle, a blue square]\n")
    cfg = parse_config(Example, ["--config", str(path), "--steps", "30"])
    assert (cfg.steps, cfg.rate, cfg.flag, cfg.prompts) == (30, 3e-4, True, ["a red circle", "a blue square"])


def test_values_are_converted_to_the_annotated_type():
    cfg = parse_config(Example, ["--steps", "5", "--rate", "1e-3", "--flag", "yes", "--path", "runs/x",
                                 "--gamma", "5", "--timesteps", "1,2, 3"])  # fmt: skip
    assert cfg == Example(steps=5, rate=1e-3, flag=True, path="runs/x", gamma=5.0, timesteps=[1, 2, 3])
    assert isinstance(cfg.gamma, float) and isinstance(cfg.steps, int)


def test_none_is_accepted_only_where_the_annotation_allows_it():
    assert parse_config(Example, ["--path", "none", "--gamma", "null"]).path is None
    with pytest.raises(ConfigError, match="steps"):
        parse_config(Example, ["--steps", "none"])


def test_list_flags_split_on_commas_or_read_a_yaml_list_for_items_with_commas():
    assert parse_config(Example, ["--prompts", "a red circle, a blue square"]).prompts == [
        "a red circle",
        "a blue square",
    ]
    cfg = parse_config(Example, ["--prompts", '["a cat, photo", "a dog"]'])
    assert cfg.prompts == ["a cat, photo", "a dog"]
    assert parse_config(Example, ["--prompts", ""]).prompts == []


def test_a_single_yaml_value_for_a_list_key_is_a_one_item_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("timesteps: 500\n")
    assert parse_config(Example, ["--config", str(path)]).timesteps == [500]


def test_wrong_types_and_unknown_keys_fail_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'steps'"):
        parse_config(Example, ["--steps", "many"])
    with pytest.raises(ConfigError, match="'steps'"):
        parse_config(Example, ["--steps", "2.5"])
    with pytest.raises(ConfigError, match="'flag'"):
        parse_config(Example, ["--flag", "maybe"])
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        parse_config(Example, ["--config", str(path)])
    path.write_text("steps: true\n")  # YAML booleans are ints to Python; not here
    with pytest.raises(ConfigError, match="'steps'"):
        parse_config(Example, ["--config", str(path)])


def test_unknown_or_abbreviated_flags_fail():
    with pytest.raises(SystemExit):
        parse_config(Example, ["--stepz", "3"])
    with pytest.raises(SystemExit):  # no prefix matching: --step is not --steps
        parse_config(Example, ["--step", "3"])


def test_bad_config_files_fail(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(Example, ["--config", str(tmp_path / "missing.yaml")])
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(Example, ["--config", str(path)])


def test_a_saved_config_loads_back_equal(tmp_path):
    cfg = Example(name="x", steps=3, flag=True, gamma=5.0, prompts=["a, b", "c"], timesteps=[1])
    save_yaml(cfg, tmp_path / "saved.yaml")
    assert parse_config(Example, ["--config", str(tmp_path / "saved.yaml")]) == cfg


def test_help_shows_the_defaults_of_factory_fields(capsys):
    with pytest.raises(SystemExit):
        parse_config(Example, ["--help"])
    assert "[100, 500]" in capsys.readouterr().out


@dataclass
class Base:
    """A base entry point."""

    FOREIGN_FLAGS: ClassVar[dict[str, str]] = {"num_steps": "--steps", "push": "nothing is uploaded"}
    SECTION: ClassVar[str] = "Optimisation: steps are optimizer steps."

    # Optimisation: steps are optimizer steps.
    steps: int = 10  # steps to train for
    rate: float = 1e-4  # the learning rate
    # Output: files
    # (two lines)
    out: str = "runs"  # where 100% of the files go


@dataclass
class Derived(Base):
    """A derived entry point."""

    steps: int = 20  # a redeclared field keeps its section
    rate: float = 2e-3
    extra: list[int] = field(  # a field over
        default_factory=lambda: [1, 2]  # several lines
    )


def test_descriptions_and_sections_come_from_the_source_comments():
    assert field_docs(Base) == {
        "steps": (Base.SECTION, "steps to train for"),
        "rate": (Base.SECTION, "the learning rate"),
        "out": ("Output: files (two lines)", "where 100% of the files go"),
    }
    docs = field_docs(Derived)
    assert docs["steps"] == (Base.SECTION, "a redeclared field keeps its section")
    assert docs["rate"][1] == "the learning rate"  # no comment of its own: the base's
    assert docs["extra"][1] == "a field over several lines"


def test_help_groups_the_options_by_section_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_config(Derived, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Optimisation: steps are optimizer steps. --steps STEPS a redeclared field" in text
    assert "--steps STEPS a redeclared field keeps its section (default: 20)" in text
    assert "--out OUT where 100% of the files go (default: runs)" in text  # % is not a format here


def test_a_foreign_flag_fails_naming_ours_or_why_there_is_none(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(Derived, ["--num_steps", "3"])
    assert "--num_steps is diffusers' name; sdlite's is --steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Derived, ["--push=true"])
    assert "no equivalent of: nothing is uploaded" in capsys.readouterr().err
    path = tmp_path / "c.yaml"
    path.write_text("num_steps: 3\n")
    with pytest.raises(ConfigError, match="sdlite's is --steps"):
        parse_config(Derived, ["--config", str(path)])


# ---- hostile config files (issue 33, items 6 and 12) ------------------------------------------------


def alias_bomb(depth: int) -> str:
    """A list key whose items alias the item before, nine times each: 9**depth strings in a few hundred
    bytes."""
    lines = ["prompts:", "  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once_naming_the_alias(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(6))  # 531,441 strings; the 523-byte one has 9**9
    assert len(path.read_bytes()) < 523
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml': line 3: YAML alias \*a0 refused"):
        parse_config(Example, ["--config", str(path)])
    assert time.perf_counter() - started < 1


def test_a_yaml_list_on_the_command_line_may_not_alias_either():
    with pytest.raises(ConfigError, match=r"'prompts'.*alias \*x refused"):
        parse_config(Example, ["--prompts", "[&x a red circle, *x]"])


def test_a_config_file_over_one_mebibyte_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("steps: 3\n" + "# padding\n" * 110_000)  # 1.1 MB of comments: valid YAML
    with pytest.raises(ConfigError, match=r"big.yaml' is over the 1,048,576 bytes"):
        parse_config(Example, ["--config", str(path)])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("path: {a: 1}\n", "'path': a mapping where a string belongs"),
        ("name: [runs, x]\n", "'name': a list where a string belongs"),
        ("steps: {a: 1}\n", "'steps': a mapping where a whole number belongs"),
        ("rate: [1]\n", "'rate': a list where a number belongs"),
        ("flag: [true]\n", "'flag': a list where true or false belongs"),
        ("prompts: [[a, b], c]\n", "'prompts': a list within the list"),
        ("prompts: [{a: 1}]\n", "'prompts': a list within the list"),
        ("prompts: {a: 1}\n", "'prompts': a mapping where a list belongs"),
    ],
)
def test_a_list_or_mapping_where_a_single_value_belongs_is_refused_naming_the_key(text, expected, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        parse_config(Example, ["--config", str(path)])


def test_a_config_file_that_is_not_utf8_is_named_in_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml' is not UTF-8 text \(byte 9: invalid") as refused:
        parse_config(Example, ["--config", str(path)])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("text", "key"), [("1: x\nstepz: 2\n", "1"), ("on: 3\n", "True"), ("null: 3\n", "None")]
)
def test_a_yaml_key_that_is_not_a_name_is_refused_naming_it(text, key, tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"keys.yaml: key {key} .* is not a setting name"):
        parse_config(Example, ["--config", str(path)])


def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_place(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("steps: 3\nname: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml': line 3, column 1: not valid YAML") as refused:
        parse_config(Example, ["--config", str(path)])
    assert "\n" not in str(refused.value)


def test_the_debug_flag_is_accepted_and_is_not_a_setting():
    assert parse_config(Example, ["--debug", "--steps", "3"]) == Example(steps=3)
