"""The check of every row before training: what is wrong with each, skipped or kept, all listed.

Scraped data has bad rows, and a run should find them before step 0, not in the middle of an epoch.
``clean_rows`` decodes every image once (a cache of images that decoded, ``DecodedImages``, spares a
later run the work): a file that is not a complete image (corrupt, truncated, not an image, missing,
not a regular file, over the byte or pixel limit) and a metadata line ``load_rows`` could not read are
skipped or, with ``bad_data="error"``, stop the run; grayscale, palette, 16-bit and transparent images
are converted, images smaller than the resolution upscaled, missing captions trained as the empty
caption, captions longer than the tokenizer's limit truncated, and rows naming an image another row
names kept. Each kind is counted in one log line and every row listed in a report (bad_files.txt),
each problem once: a caption folder's row says what is wrong with its caption file (captions.py's
CAPTION_PROBLEM column) instead of "no caption".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import repeat
from pathlib import Path

import datasets

from sdlite.data.captions import CAPTION_PROBLEM
from sdlite.data.dataset import PROBLEM, WHERE, DataError, caption_text, image_bytes, row_name
from sdlite.data.decoding import check_aspect, decode_image, open_image, pixel_limit, why_unusable


def check_image(
    entry, resolution: int, decoded=None, max_pixels: int | None = None
) -> tuple[str | None, str | None]:
    """(why the row's image is unusable, what conversion it needs): either may be None. ``decoded``: a
    set-like record of image bytes known to decode (skipped here, added to when they do). The pixel
    limit (pixel_limit(resolution, max_pixels)) is checked from the header every time."""
    if not isinstance(entry, dict) or not (entry.get("bytes") or entry.get("path")):
        return "no image", None
    try:
        data = image_bytes(entry)
        limit = pixel_limit(resolution, max_pixels)
        image = open_image(data, limit)
        mode, size = image.mode, image.size
        check_aspect(size)  # the transforms refuse it too: here it is listed before training
        if decoded is None or data not in decoded:
            decode_image(data, limit)
            if decoded is not None:
                decoded.add(data)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... on bad files
        return why_unusable(e), None
    fixes = []
    if mode != "RGB":
        fixes.append(f"converted from {mode}")
    if min(size) < resolution:
        fixes.append(f"upscaled from {size[0]}x{size[1]}")
    return None, ", ".join(fixes) or None


def clean_rows(
    rows: datasets.Dataset,
    image_column: str,
    caption_column: str,
    resolution: int,
    tokenizer=None,
    bad_data: str = "skip",
    report: str | Path | None = None,
    log: Callable[[str], None] = print,
    decoded=None,
    max_pixels: int | None = None,
) -> datasets.Dataset:
    """The usable rows, each image decoded once to be sure (see the module docstring).

    bad_data: "skip" drops unusable rows, "error" raises DataError naming them. ``report``: a text
    file listing every row with a problem and what was done (removed when there is none). ``decoded``:
    see check_image (sdlite.data.cache.DecodedImages: a warm cache skips the decoding). ``max_pixels``:
    the most pixels an image may declare (None: pixel_limit(resolution)).
    """
    problems: list[tuple[str, str, str]] = []  # (row, problem, what was done)
    bad: list[int] = []
    counts: Counter[str] = Counter()  # one log line per kind of problem
    captions = rows[caption_column]
    marked = PROBLEM in rows.column_names  # metadata lines load_rows could not read (bad_data="skip")
    marks = zip(rows[PROBLEM], rows[WHERE]) if marked else repeat((None, None))
    # What caption_rows found wrong with each row's caption file (a caption folder's rows only).
    caption_problems = rows[CAPTION_PROBLEM] if CAPTION_PROBLEM in rows.column_names else repeat(None)
    first_row_of: dict[str, str] = {}  # image file -> the row that names it first
    limit = getattr(tokenizer, "model_max_length", None)
    entries = (e for chunk in rows.select_columns([image_column]).iter(256) for e in chunk[image_column])
    action = "skipped" if bad_data == "skip" else "error"
    rows_in = zip(entries, captions, marks, caption_problems)
    for index, (entry, caption, (problem, where), caption_problem) in enumerate(rows_in):
        name = where or row_name(entry, index)
        if problem:
            bad.append(index)
            problems.append((name, problem, action))
            listed = not (where or "").rsplit(" line ", 1)[-1].isdigit()  # a folder's file, not a table line
            counts[f"{'files refused when listed' if listed else 'unreadable metadata rows'} ({action})"] += 1
            continue
        unusable, fix = check_image(entry, resolution, decoded, max_pixels)
        text = caption_text(caption)
        if unusable:
            bad.append(index)
            problems.append((name, unusable, action))
            counts[f"unusable images ({action})"] += 1
            continue
        path = entry.get("path") if not entry.get("bytes") else None
        if path and path in first_row_of:
            problems.append((name, f"the same image file as {first_row_of[path]}", "kept, trains twice"))
            counts["rows naming an image another row names (kept)"] += 1
        elif path:
            first_row_of[path] = where or f"row {index}"
        if fix:
            problems.append((name, fix, "kept"))
            counts["images converted or upscaled"] += 1
        if not text.strip():  # one row, one listing: why there is no caption, when caption_rows knows
            problems.append((name, caption_problem or "no caption", "kept, trained with the empty caption"))
            counts["rows without a caption (trained with the empty one)"] += 1
            continue
        if caption_problem:
            problems.append((name, caption_problem, "kept"))
            counts["odd caption files (kept)"] += 1
        # A token spans at least one character: only long texts need the tokenizer.
        if limit and len(text) > limit - 2 and len(tokenizer(text, verbose=False).input_ids) > limit:
            problems.append((name, f"caption longer than {limit} tokens", "kept, truncated"))
            counts[f"captions truncated to {limit} tokens"] += 1
    if report is not None:
        report = Path(report)
        if problems:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text("".join(f"{n}\t{p}\t{a}\n" for n, p, a in problems))
        else:
            report.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
    listed = f" (listed in {str(report)!r})" if report is not None and problems else ""
    if bad and bad_data == "error":
        names = ", ".join(f"{n} ({p})" for n, p, a in problems if a == "error")
        raise DataError(f"{len(bad)} rows have unusable images{listed}: {names[:500]}; fix or remove them, "
                        "or set bad_data to skip")  # fmt: skip
    if counts:
        log(f"data: {', '.join(f'{n} {what}' for what, n in counts.items())}{listed}")
    if len(bad) == len(rows):
        raise DataError(f"none of the {len(rows)} rows has a usable image{listed}")
    if bad:
        keep = sorted(set(range(len(rows))) - set(bad))
        rows = rows.select(keep)
    internal = [c for c in (PROBLEM, WHERE, CAPTION_PROBLEM) if c in rows.column_names]
    return rows.remove_columns(internal) if internal else rows
