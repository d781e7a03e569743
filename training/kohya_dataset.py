"""kohya's dataset config (``--dataset_config FILE.toml``) read as the flags it stands for.

    [general]
    shuffle_caption = true
    caption_extension = ".txt"

    [[datasets]]
    resolution = 512
    batch_size = 4
    enable_bucket = true

      [[datasets.subsets]]
      image_dir = "photos/mystar"
      class_tokens = "mystar star"     # a DreamBooth subset: its images captioned with this
      num_repeats = 10

      [[datasets.subsets]]
      is_reg = true                    # class images of the prior-preservation loss
      image_dir = "photos/stars"
      class_tokens = "star"

What sdlite has a setting for is read as kohya's own flag of that name would be (training/foreign_flags.py
then reads it as ours, so ``batch_size`` is ``--train_batch_size`` and ``enable_bucket`` is
``--aspect_buckets true``); a key sdlite has no behaviour for is refused naming it. sdlite trains one
data set: one subset of images (a folder of captioned images, or with class_tokens the DreamBooth
subject, every image captioned with them unless caption files lie beside them, which sd-scripts then
reads, as sdlite does a caption folder), and at most one ``is_reg`` subset of class images (DreamBooth's
prior). A lone subset's ``num_repeats`` only
lengthens kohya's epoch, which matters here only where epochs are turned into steps. Options of
``[general]`` apply to every data set and subset, a data set's to its subsets, as in sd-scripts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_BYTES = 1 << 20  # as a YAML config: a data set config is a few hundred bytes
# Options with a setting here -> kohya's flag of the same meaning (read on by foreign_flags).
OPTIONS = {
    "resolution": "resolution",
    "batch_size": "train_batch_size",
    "enable_bucket": "enable_bucket",
    "min_bucket_reso": "min_bucket_reso",
    "max_bucket_reso": "max_bucket_reso",
    "bucket_reso_steps": "bucket_reso_steps",
    "bucket_no_upscale": "bucket_no_upscale",
    "caption_extension": "caption_extension",
    "keep_tokens": "keep_tokens",
    "shuffle_caption": "shuffle_caption",
    "flip_aug": "flip_aug",
    "random_crop": "random_crop",
    "caption_dropout_rate": "caption_dropout_rate",
    "caption_tag_dropout_rate": "caption_tag_dropout_rate",
    "caption_prefix": "caption_prefix",
    "caption_separator": "caption_separator",
}
SUBSET_KEYS = ("image_dir", "num_repeats", "class_tokens", "is_reg")
SWITCHES = ("enable_bucket", "flip_aug", "bucket_no_upscale")  # kohya's flags that take no value

Items = list[tuple[str, list[str]]]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):  # resolution = [512, 768]
        return ",".join(str(v) for v in value)
    return str(value)


def _options(table: dict, where: str, problems: list[str]) -> Items:
    """kohya flags for a table's options (its subsets and data sets left to the caller)."""
    items: Items = []
    for key, value in table.items():
        if key in ("datasets", "subsets") or key in SUBSET_KEYS:
            continue
        if key not in OPTIONS:
            problems.append(f"{where}: {key!r} is not supported here (supported: {', '.join(OPTIONS)})")
        elif key in SWITCHES:
            if value is True:
                items.append((OPTIONS[key], []))
        else:
            items.append((OPTIONS[key], [_value(value)]))
    return items


def _has_captions(folder: str) -> bool:
    """Whether caption files lie in the folder: sd-scripts then reads them rather than class_tokens."""
    root = Path(folder).expanduser()
    return root.is_dir() and any(next(root.rglob(f"*{ext}"), None) for ext in (".txt", ".caption"))


def read(path: str) -> tuple[Items, list[str], int]:
    """(kohya flags, problems, the lone subset's num_repeats) of the dataset config at ``path``."""
    name = f"dataset config {path!r}"
    try:
        import tomllib  # Python 3.11 on
    except ImportError:
        return [], [f"{name}: reading TOML needs Python 3.11 or later"], 1
    try:
        raw = Path(path).read_bytes()[: MAX_BYTES + 1]
        if len(raw) > MAX_BYTES:
            return [], [f"{name} is over {MAX_BYTES:,} bytes: not a data set config"], 1
        config = tomllib.loads(raw.decode("utf-8"))
    except OSError as e:
        return [], [f"{name} cannot be read ({e.strerror or e})"], 1
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        return [], [f"{name} is not TOML ({e})"], 1
    problems: list[str] = []
    unknown = sorted(set(config) - {"general", "datasets"})
    if unknown:
        problems.append(f"{name}: tables {unknown} are not read (only [general] and [[datasets]])")
    items = _options(config.get("general", {}), f"{name} [general]", problems)
    datasets = config.get("datasets", [])
    if len(datasets) != 1:
        problems.append(f"{name}: sdlite trains one [[datasets]], not {len(datasets)}")
        return items, problems, 1
    dataset = datasets[0]
    items += _options(dataset, f"{name} [[datasets]]", problems)
    subsets = dataset.get("subsets", [])
    regular = [s for s in subsets if not s.get("is_reg", False)]
    classes = [s for s in subsets if s.get("is_reg", False)]
    if len(regular) != 1 or len(classes) > 1:
        problems.append(
            f"{name}: sdlite trains one subset of images and at most one is_reg subset, not {len(regular)} "
            f"and {len(classes)}: put several folders of images as N_name folders under one folder and "
            "give it as image_dir (N: its repeats)"
        )
        return items, problems, 1
    for i, subset in enumerate(subsets):
        items += _options(subset, f"{name} subset {i + 1}", problems)
    subject, repeats = regular[0], regular[0].get("num_repeats", 1)
    if "image_dir" not in subject:
        problems.append(f"{name}: the subset has no image_dir")
    elif subject.get("class_tokens") and not _has_captions(subject["image_dir"]):  # DreamBooth's subset
        items += [
            ("instance_data_dir", [subject["image_dir"]]),
            ("instance_prompt", [subject["class_tokens"]]),
        ]
    else:
        items.append(("train_data_dir", [subject["image_dir"]]))
    if classes:
        regs = classes[0]
        if not subject.get("class_tokens") or not regs.get("class_tokens") or "image_dir" not in regs:
            problems.append(f"{name}: an is_reg subset is DreamBooth's class images: give it image_dir and "
                            "class_tokens, and the subject's subset its class_tokens")  # fmt: skip
        else:
            items += [("class_data_dir", [regs["image_dir"]]), ("class_prompt", [regs["class_tokens"]])]
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        problems.append(f"{name}: num_repeats {repeats!r} must be a whole number >= 1")
        repeats = 1
    return items, problems, repeats
