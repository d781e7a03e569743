"""How many held-out shapes a VAE gives back as they went in: the demo recipe's VAE beside other
levers, over training seeds, read leniently and strictly.

    python benchmarks/vae_reader.py --data runs/demo/data --variants recipe-2500,recipe --seeds 0,1,2,3,4
    python benchmarks/vae_reader.py --data runs/demo/data --measure runs/demo/vae/vae

Each variant is configs/tiny-vae.yaml with the keys of ``VARIANTS`` over it, trained on data/train
(one run at a time, on torch's thread count: --threads) into out/<variant>-s<seed>. Each VAE (trained
here or named by --measure) then encodes and decodes the held-out images of data/test (the mean of
q(z|x), as the held-out PSNR does), and a row says: parameters, training seconds, PSNR, the share of
round trips whose colour and shape the lenient reader (sdlite.fidelity.analyse_image) reads as in the
original, the share that read back clean and the same, box within a pixel, by the strict reader
(sdlite.shape_reading), that share per shape, and the defects seen most. Rows also go to out/rows.jsonl.

What it measured, with the machine: benchmarks/RESULTS.md, "The VAE's round trip, read strictly".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Keys over configs/tiny-vae.yaml (2,500 steps and edge_weight 20 since this benchmark; 500 steps and
# the plain mean before). "preset": the tiny preset's own VAE ([16, 32, 32] with attention in the middle
# blocks, 0.24 M), the recipe's before it was narrowed.
PRESET = {"vae_block_out_channels": [16, 32, 32], "vae_mid_block_attention": True}
PLAIN = {"edge_weight": 0.0}
VARIANTS: dict[str, dict] = {
    "recipe": {},
    "recipe-500": {**PLAIN, "max_steps": 500},
    "recipe-1500": {**PLAIN, "max_steps": 1500},
    "recipe-2500": {**PLAIN, "max_steps": 2500},
    "recipe-3500": {**PLAIN, "max_steps": 3500},
    "preset-500": {**PRESET, **PLAIN, "max_steps": 500},
    "recipe-500-l1": {**PLAIN, "max_steps": 500, "reconstruction_loss": "l1"},
    "recipe-500-lr5e-3": {**PLAIN, "max_steps": 500, "learning_rate": 5.0e-3},
}


def train(variant: str, seed: int, data: Path, out: Path) -> tuple[Path, float]:
    """Train one variant; (its vae folder, seconds)."""
    from training import train_vae
    from training.config.vae import VAETrainConfig
    from training.demo import config

    cfg = config(
        VAETrainConfig,
        "tiny-vae.yaml",
        train_data_dir=data / "train",
        eval_data_dir=data / "test",
        output_dir=out / f"{variant}-s{seed}",
        seed=seed,
        **VARIANTS[variant],
    )
    start = time.perf_counter()
    result = train_vae.train(cfg)
    return Path(result["path"]), time.perf_counter() - start


def measure(vae_path: Path, data: Path, count: int) -> dict:
    """PSNR and the round trip read both ways, of the VAE at ``vae_path`` on data/test."""
    from diffusers import AutoencoderKL

    from sdlite.fidelity import analyse_image
    from sdlite.shape_reading import round_trip_reading, vae_round_trip
    from training.cmd_evaluate import held_out_data
    from training.train_vae import psnr

    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    images, _ = held_out_data(str(data / "test"), count, vae.config.sample_size, seed=0)
    originals = list(images.permute(0, 2, 3, 1).add(1).mul(127.5).round().byte().numpy())
    copies = vae_round_trip(vae, images)
    lenient = [
        (a.colour, a.shape) == (b.colour, b.shape)
        for a, b in ((analyse_image(o), analyse_image(c)) for o, c in zip(originals, copies))
    ]
    trip = round_trip_reading(originals, copies)
    return {
        "vae": str(vae_path),
        "parameters_m": sum(p.numel() for p in vae.parameters()) / 1e6,
        "psnr": psnr(vae, images),
        "lenient": sum(lenient) / len(lenient),
        "strict": trip.fraction,
        "by_shape": {s: a / max(t, 1) for s, (a, t) in sorted(trip.by_shape.items())},
        "images": trip.total,
        "defects": trip.defects.most_common(3),
    }


def row(name: str, r: dict) -> str:
    shapes = " ".join(f"{v:>7.1%}" for v in r["by_shape"].values())
    seconds = f"{r['seconds']:>6.0f}" if r.get("seconds") else f"{'-':>6}"
    defects = "; ".join(f"{d} ({n})" for d, n in r["defects"])
    return (
        f"{name:<22} {r['parameters_m']:>6.3f} {seconds} {r['psnr']:>6.2f} {r['lenient']:>8.1%} "
        f"{r['strict']:>7.1%} {shapes}  {defects}"
    )


HEADER = (
    f"{'VAE':<22} {'M par':>6} {'train':>6} {'PSNR':>6} {'lenient':>8} {'strict':>7} "
    f"{'circle':>7} {'square':>7} {'triangl':>7}  defects seen most"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="train/ and test/ folders")
    parser.add_argument("--out", type=Path, default=Path("runs/vae-reader"))
    parser.add_argument("--variants", default="recipe-2500,recipe", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--measure", nargs="*", default=[], type=Path, help="VAE folders to measure")
    parser.add_argument("--count", type=int, default=256, help="held-out images read")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown and not args.measure:
        raise SystemExit(
            f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(str(p), p, None) for p in args.measure]
    if not args.measure:
        runs = [(f"{v} s{s}", v, int(s)) for v in args.variants.split(",") for s in args.seeds.split(",")]
    print(HEADER, flush=True)
    for name, what, seed in runs:
        path, seconds = (what, None) if seed is None else train(what, seed, args.data, args.out)
        r = {"name": name, "seconds": seconds, **measure(path, args.data, args.count)}
        print(row(name, r), flush=True)
        with open(args.out / "rows.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
