"""``sdlite data shapes``: write the built-in coloured-shapes data set as an image folder."""

from __future__ import annotations

import argparse

from sdlite.data.shapes import write_dataset


def shapes(args: argparse.Namespace) -> int:
    out = write_dataset(
        args.out,
        count=args.count,
        seed=args.seed,
        image_size=args.size,
        colours=args.colours,
        shapes=args.shapes,
        exclude=args.exclude,
        size_word_prob=args.size_word_prob,
        holdout=args.holdout,
    )
    split = f" in train/ and {args.holdout} in test/" if args.holdout else ""
    print(f"wrote {args.count} images{split} with metadata.jsonl to {out}")
    return 0
