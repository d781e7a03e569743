"""WebDataset tar shards as training rows: one more kind of data source for ``load_rows``.

A shard is an uncompressed tar of samples, each sample the members that share a name up to the first
dot (``000123.jpg``, ``000123.txt``, ``000123.json``), as img2dataset writes them. ``datasets`` reads
the shards (``load_dataset("webdataset", data_files=...)``); here:

- every shard's members are listed first (``check_shards``: headers only, nothing decoded), so that a
  shard cut short or with a broken header stops the run with one line naming the shard and the last
  member that read, before ``datasets`` copies anything;
- the image is the member of an image extension (a shard may mix ``.jpg`` and ``.png``), the caption
  the ``.txt`` (or ``.text``) member, else the ``caption_column`` field of a ``.json`` member, as a
  ``metadata.jsonl`` line names it; other members are not kept;
- a sample without an image or without a caption is a bad row: with bad_data="error" one line names
  how many and the first of them; with "skip" it stays in the rows marked, for ``clean_rows`` to skip
  and list, as a bad metadata line is (sdlite/data/dataset.py). An image member whose bytes do not
  decode is found by ``clean_rows`` as any bad image is.

Images stay encoded (the latent cache keys on their bytes); buckets and caption options read the rows
as they read a folder's.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import datasets
from datasets.packaged_modules.webdataset.webdataset import IMAGE_EXTENSIONS, base_plus_ext

from sdlite.data.files import DataError, shown

TEXT_EXTENSIONS = ("txt", "text")  # members datasets decodes as text


def tar_shards(path: Path) -> list[Path]:
    """The tar shards of a data source: a .tar file, or the .tar files directly in a folder (name order)."""
    if path.is_file():
        return [path] if path.suffix.lower() == ".tar" else []
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".tar")


def check_shards(shards: list[Path]) -> set[str]:
    """The field names (extensions) of every shard's members, from their headers; DataError naming the
    shard and the last member that read for a shard that does not read to its end."""
    fields: set[str] = set()
    for shard in shards:
        last, size = None, shard.stat().st_size
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if member.offset_data + member.size > size:  # tarfile stops there without a word
                        raise tarfile.ReadError(f"member {member.name!r} cut short at byte {size}")
                    if member.isfile() and base_plus_ext(member.name)[1]:
                        last = member.name
                        fields.add(base_plus_ext(member.name)[1])
        except (tarfile.TarError, OSError, EOFError) as error:
            after = f"after member {last!r}" if last else "at its first member"
            raise DataError(
                f"tar shard {shown(shard)!r} is corrupt {after} ({error}): re-create it (or copy it again), "
                "or move it out of the data folder"
            ) from None
    return fields


def webdataset_rows(path: Path, image_column: str, caption_column: str, bad_data: str,
                    problem: str, where: str) -> datasets.Dataset:  # fmt: skip
    """The rows of tar shards (a file or a folder of them): ``image_column`` (encoded images) and
    ``caption_column``; with bad_data="skip" bad samples marked in columns ``problem`` and ``where``."""
    shards = tar_shards(path)
    fields = check_shards(shards)
    images = sorted(f for f in fields if f.split(".")[-1].lower() in IMAGE_EXTENSIONS)
    texts = sorted(f for f in fields if f.split(".")[-1].lower() in TEXT_EXTENSIONS)
    if not images:
        raise DataError(f"the tar shards of {shown(path)!r} hold no images (members such as 000123.jpg)")
    features = {f: datasets.Image(decode=False) for f in images} | {
        f: datasets.Value("string") for f in texts
    }
    if "json" in fields:  # only the caption of a .json member is kept
        features["json"] = {caption_column: datasets.Value("string")}
    features |= {"__key__": datasets.Value("string"), "__url__": datasets.Value("string")}
    # Only the fields named in features are kept of each sample: others are neither stored nor read after.
    raw = datasets.load_dataset("webdataset", data_files=[str(s) for s in shards], split="train",
                                features=datasets.Features(features))  # fmt: skip
    captions, problems, wheres = _samples(raw, images, texts, "json" in fields, caption_column)
    named = [f"{w}: {why}" for w, why in zip(wheres, problems) if why]
    if named and bad_data != "skip":
        first = "; ".join(named[:3]) + (f"; and {len(named) - 3} more" if len(named) > 3 else "")
        raise DataError(
            f"{len(named)} samples of the tar shards cannot be trained: {first}. Add the missing members, "
            "or set bad_data to skip to train without them (they are listed)"
        )
    rows = _one_image_column(raw, images, image_column)
    rows = rows.add_column(caption_column, captions)
    if named:
        rows = rows.add_column(problem, problems).add_column(
            where, [w if p else None for w, p in zip(wheres, problems)]
        )
    return rows


def _samples(raw: datasets.Dataset, images: list[str], texts: list[str], has_json: bool, caption_column: str):
    """Each sample's caption (a text member's, else its .json's ``caption_column``), what is wrong with
    it (None when nothing) and where it is ("shard sample 'key'"), read without the images."""
    captions, problems, wheres = [], [], []
    has_image = _not_null(raw, images)
    columns = texts + ["json"] * has_json + ["__key__", "__url__"]
    for chunk in raw.select_columns(columns).iter(batch_size=1024):
        for i in range(len(chunk["__key__"])):
            caption = next((chunk[t][i] for t in texts if chunk[t][i] is not None), None)
            if caption is None and has_json and chunk["json"][i] is not None:
                caption = chunk["json"][i].get(caption_column)
            why = None
            if not has_image[len(captions)]:
                why = f"no image member ({', '.join('.' + f for f in images)})"
            elif caption is None:
                why = f"no caption member (.txt, or {caption_column!r} in a .json)"
            captions.append(caption)
            problems.append(why)
            wheres.append(f"{shown(Path(chunk['__url__'][i]).name)} sample {chunk['__key__'][i]!r}")
    return captions, problems, wheres


def _not_null(rows: datasets.Dataset, columns: list[str]) -> list[bool]:
    """Whether any of ``columns`` holds a value, row by row, read from the Arrow table (no image copied)."""
    table = rows.data.table
    present = [False] * len(rows)
    for column in columns:
        for i, valid in enumerate(table.column(column).is_valid().to_pylist()):
            present[i] = present[i] or valid
    return present


def _one_image_column(rows: datasets.Dataset, images: list[str], image_column: str) -> datasets.Dataset:
    """The image members' fields as one column: renamed when the shards hold one image extension, else
    merged (a pass that writes the images once more, so only for shards that mix extensions)."""
    if len(images) > 1:

        def merge(batch: dict) -> dict:
            return {
                image_column: [
                    next((e for e in entries if e is not None), None)
                    for entries in zip(*(batch[f] for f in images))
                ]
            }

        features = datasets.Features({image_column: datasets.Image(decode=False)})
        return rows.map(merge, batched=True, remove_columns=rows.column_names, features=features)
    rows = rows.select_columns(images)
    return rows.rename_column(images[0], image_column) if images[0] != image_column else rows
