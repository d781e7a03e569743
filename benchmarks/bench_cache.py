"""The latent and text cache at scale: files made, start-up time and memory, read rate.

Three measurements, each in a fresh subprocess (so that its peak RSS is its own), on the tree given by
``--tree`` (default: this one; ``--tree /path/to/an/older/checkout`` measures its cache the same way,
through the same API: ``TensorCache``, ``fill``, ``load``, ``cache_latents``, ``cache_text``,
``DecodedImages``):

- ``files``: what the trainer's start-up does to 512 shapes images (32 px, the tiny preset): every
  image checked (``clean_rows`` with ``DecodedImages``), latents of both flips, the captions' text
  embeddings; the files the cache folder then holds, and the seconds it took;
- ``startup``: ``--entries`` synthetic entries (mean and std of a 4 x side x side latent, drawn at
  random: no VAE runs, so the time is the cache's own) filled from nothing ("cold"), then a new
  process's start on the full cache ("warm": every key looked up, none computed), each with its time
  per entry, the files created and the peak RSS;
- ``read``: a new process reads ``--reads`` entries in random order (``load``, one thread, page cache
  warm), entries/s, against what a training step needs (images/s x 2: its latents and its caption).

    python benchmarks/bench_cache.py                            # 100,000 entries of 4x16x16
    python benchmarks/bench_cache.py --tree /work/main --entries 20000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident memory now (after its imports: the floor its peak is measured from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def files_under(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def keys_of(count: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(count)]


def synthetic(side: int):
    import torch

    def compute(positions: list[int]) -> dict:
        return {
            "mean": torch.randn(len(positions), 4, side, side),
            "std": torch.rand(len(positions), 4, side, side),
        }

    return compute


def child_files(root: Path) -> dict:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlite.data.cache import DecodedImages, TensorCache, cache_latents, cache_text
    from sdlite.data.cleaning import clean_rows
    from sdlite.data.dataset import ImageTransform, load_rows
    from sdlite.data.shapes import write_dataset
    from sdlite.presets import get_preset
    from sdlite.tokenizer import clip_tokenizer, token_ids

    preset = get_preset("tiny")
    torch.manual_seed(0)
    vae = AutoencoderKL(**preset.config("vae")).eval()
    encoder = CLIPTextModel(CLIPTextConfig(**preset.config("text_encoder"))).eval()
    data, cache_dir = write_dataset(root / "data", count=512), root / "cache"
    start = time.perf_counter()
    rows = clean_rows(load_rows(data), "image", "text", 32, None, "skip", None, lambda _: None,
                      DecodedImages(cache_dir))  # fmt: skip
    cache = TensorCache(cache_dir)
    _, latents = cache_latents(cache, rows, "image", ImageTransform(32), vae, flips=(False, True))
    ids = token_ids(clip_tokenizer(preset.max_length), list(rows["text"]))
    _, texts = cache_text(cache, ids, encoder)
    seconds = time.perf_counter() - start
    return {"images": len(rows), "latents": latents, "texts": texts, "captions": len(set(rows["text"])),
            "files": files_under(cache_dir), "seconds": seconds}  # fmt: skip


def child_startup(root: Path, entries: int, side: int, warm: bool) -> dict:
    from sdlite.data.cache import TensorCache

    keys = keys_of(entries)
    compute = synthetic(side)
    calls, before = [], rss_mb()
    start = time.perf_counter()
    computed = TensorCache(root).fill(keys, lambda p: calls.append(len(p)) or compute(p), batch_size=64)
    seconds = time.perf_counter() - start
    assert computed == (0 if warm else entries) and sum(calls) == computed
    return {"seconds": seconds, "us_per_entry": 1e6 * seconds / entries, "files": files_under(root),
            "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def child_read(root: Path, entries: int, reads: int) -> dict:
    from sdlite.data.cache import TensorCache

    keys = random.Random(0).sample(keys_of(entries), min(reads, entries))
    cache = TensorCache(root)
    start = time.perf_counter()
    cache.load(keys[0])  # the index built: what a run pays once, not per read
    first = time.perf_counter() - start
    start = time.perf_counter()
    for key in keys:
        cache.load(key)["mean"].sum()  # touch the bytes: a memory map reads lazily
    seconds = time.perf_counter() - start
    return {"reads": len(keys), "entries_per_s": len(keys) / seconds, "first_read_s": first}


def run_child(tree: Path, *argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", *argv], cwd=tree, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"child {argv} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=str(ROOT), help="the checkout whose cache is measured")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--side", type=int, default=16, help="latent side of the synthetic entries")
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--parts", default="files,startup,read")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        part, root, *rest = args.child
        if part == "files":
            result = child_files(Path(root))
        elif part in ("cold", "warm"):
            result = child_startup(Path(root), int(rest[0]), int(rest[1]), part == "warm")
        else:
            result = child_read(Path(root), int(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return
    tree, parts = Path(args.tree).resolve(), args.parts.split(",")
    print(f"tree {tree}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        if "files" in parts:
            print("files (512 shapes images):", json.dumps(run_child(tree, "files", f"{tmp}/files")))
        if "startup" in parts or "read" in parts:
            shape = [str(args.entries), str(args.side)]
            cold = run_child(tree, "cold", f"{tmp}/cache", *shape)
            print(f"cold fill of {args.entries} entries (4x{args.side}x{args.side}):", json.dumps(cold))
            print("warm start:", json.dumps(run_child(tree, "warm", f"{tmp}/cache", *shape)))
            if "read" in parts:
                read = run_child(tree, "read", f"{tmp}/cache", str(args.entries), str(args.reads))
                print("random reads:", json.dumps(read))


if __name__ == "__main__":
    main()
