"""Reading what a data source names, safely: image files, and the metadata lines that name them.

A data source is the user's, but the files it names need not be: a table may hold
``../outside/secret.png`` or ``/etc/passwd``, a path may be a FIFO (reading it blocks forever) or
``/dev/zero`` (it never ends), and a metadata file written by a script may hold a caption that is a
number, bytes that are not UTF-8 or a line that is not JSON. So:

- ``resolve_in`` keeps image paths inside the data folder unless the user allows otherwise, and
  ``listed_file_problem`` does the same for the files a folder is listed into (caption and DreamBooth
  folders), refusing names that are not UTF-8 too (a table of them cannot be built: pyarrow's
  strings are UTF-8); ``shown`` prints such a name as its bytes;
- ``read_file`` reads regular files only, and at most ``max_bytes`` of them;
- ``metadata_lines`` reads JSON-lines and CSV metadata line by line and says what is wrong with each
  bad line (its file and line number), instead of the raw ``UnicodeDecodeError`` or ``ArrowInvalid``
  that ``datasets`` would raise for the whole file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path

# The largest image file read, in bytes: far above any real photograph (a 100-megapixel JPEG is
# about 40 MB), far below what a device file or a runaway download would fill memory with.
MAX_FILE_BYTES = 256 * 2**20


class DataError(ValueError):
    """A data source that cannot be read as rows of images and captions."""


def read_file(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; DataError for anything else.

    Opened non-blocking and checked on the open descriptor, so a FIFO cannot block and a file
    swapped for a device after a check is still refused.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or other special file"
            raise DataError(f"{str(path)!r} is {kind}, not a regular file: only image files are read")
        if info.st_size > max_bytes:
            raise DataError(f"{str(path)!r} holds {info.st_size} bytes, over the limit of {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # a file that grows while read still stops at the limit
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise DataError(f"{str(path)!r} grew past the limit of {max_bytes} bytes while read")
    return data


def resolve_in(
    base: Path, name: str, allow_outside: bool = False, within: Path | None = None
) -> tuple[Path, str | None]:
    """(the path of ``name`` relative to ``base``, why it may not be read or None).

    It must lie inside ``within`` (default ``base``), the data folder. Symbolic links are followed
    before the check, so a link inside the folder to a file outside it is outside too.
    ``allow_outside`` lets a table name any file (the user trusts the table).
    """
    path = Path(os.path.normpath(base / name))  # an absolute name stays absolute
    within = base if within is None else within
    if allow_outside or path.resolve().is_relative_to(within.resolve()):
        return path, None
    return path, (
        f"image path {name!r} is outside the data folder {str(within)!r} (allow it with allow_outside_paths)"
    )


def shown(path: str | Path) -> str:
    """A path as a report or a log line can print it: bytes of its name that are not UTF-8 as ``\\xNN``.
    (A POSIX file name is bytes; Python keeps the ones that are not UTF-8 as lone surrogates, which
    no UTF-8 writer accepts.)"""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def listed_file_problem(path: Path, folder: Path, allow_outside: bool = False) -> str | None:
    """Why a file found by listing data folder ``folder`` may not be read, or None: a name that is not
    UTF-8, or a link to a file outside the folder (unless ``allow_outside``, as tables allow)."""
    if shown(path) != str(path):
        return "file name is not UTF-8 text (rename the file to train it)"
    if allow_outside or path.resolve().is_relative_to(folder.resolve()):
        return None
    return f"a link to a file outside the data folder {shown(folder)!r} (allow it with allow_outside_paths)"


def metadata_table(
    tables: list[Path], root: Path, image_key: str, allow_outside: bool, caption_key: str
) -> tuple[dict[str, list], list[str]]:
    """Every line of the metadata files ``tables``, as columns ``image`` ({"path", "bytes"} entries,
    None where the line is bad), ``caption``, ``problem`` (None on a good line) and ``where`` ("file
    line N"), and the problems as "file line N: what". Image paths are relative to their file's
    folder and must lie in the data folder ``root`` (unless ``allow_outside``)."""
    table: dict[str, list] = {"image": [], "caption": [], "problem": [], "where": []}
    problems = []
    for path in tables:
        good, bad = metadata_lines(path, image_key, caption_key)
        rows = sorted(
            [(n, row, None) for n, row in good] + [(n, None, why) for n, why in bad], key=lambda r: r[0]
        )
        for number, row, why in rows:
            image, caption = None, None
            if row is not None:
                image, why = resolve_in(path.parent, row[image_key], allow_outside, root)
                caption = row.get(caption_key)
                if isinstance(caption, list):  # several captions: the first, as caption_text reads them
                    caption = caption[0] if caption else None
            where = f"{path} line {number}"
            if why:
                problems.append(f"{where}: {why}")
            table["image"].append(None if why else {"path": str(image), "bytes": None})
            table["caption"].append(caption or None)
            table["problem"].append(why)
            table["where"].append(where)
    return table, problems


def _kind(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a list" if isinstance(value, list) else "an object"


def metadata_lines(
    path: Path, image_key: str, caption_key: str
) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """The rows of a JSON-lines or CSV metadata file as (line number, row) and the bad lines as
    (line number, what is wrong). A row is good when its line decodes as UTF-8 and parses, names an
    image (a string under ``image_key``) and has text or nothing under ``caption_key``. A list of
    texts (several captions) is good too, unless other rows hold plain text: one column, one type."""
    good: list[tuple[int, dict]] = []
    bad: list[tuple[int, str]] = []
    texts: list[str] = []  # line by line, a line that is not UTF-8 left blank (and listed)
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            texts.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            bad.append((number, f"not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})"))
            texts.append("")
    parsed = _csv_rows(texts, bad) if path.suffix.lower() == ".csv" else _json_rows(texts, bad)
    kinds = {_kind(row.get(caption_key)) for _, row in parsed}
    for number, row in parsed:
        caption, image = row.get(caption_key), row.get(image_key)
        kind = _kind(caption)
        if not isinstance(image, str) or not image:
            bad.append((number, f"no image file name (a text under {image_key!r})"))
        elif kind == "list" and "text" in kinds:
            bad.append((number, f"caption {caption_key!r} is a list where the other rows hold text"))
        elif kind not in ("text", "none", "list"):
            bad.append((number, f"caption {caption_key!r} is {kind} ({str(caption)[:40]}), not text"))
        else:
            good.append((number, row))
    return good, sorted(bad)


def _json_rows(texts: list[str], bad: list[tuple[int, str]]) -> list[tuple[int, dict]]:
    rows = []
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            bad.append((number, f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(row, dict):
            bad.append((number, f"a JSON {type(row).__name__}, not an object of columns"))
            continue
        rows.append((number, row))
    return rows


def _csv_rows(texts: list[str], bad: list[tuple[int, str]]) -> list[tuple[int, dict]]:
    """Rows under the header, by the line each starts on (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO("\n".join(texts)))
    rows: list[tuple[int, dict]] = []
    header = None
    while True:
        number = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return rows
        except csv.Error as e:
            bad.append((number, f"malformed CSV ({e})"))
            continue
        if not cells:
            continue
        if header is None:
            header = cells
        elif len(cells) != len(header):
            bad.append((number, f"{len(cells)} fields where the header has {len(header)}"))
        else:
            rows.append((number, dict(zip(header, cells))))
