"""Does a LoRA run teach the tiny shapes model a colour it never saw? Prompt fidelity before and after.

    python benchmarks/lora_new_colour.py --out runs/lora-new-colour [--threads 1] [--base_steps 900]

1. The tiny VAE (configs/tiny-vae.yaml) trained on shapes of every colour, then the tiny U-Net and
   text encoder (configs/tiny-shapes.yaml, but a text encoder of --base_text_encoder_layers, 2: the
   recipe's 0 layers have no attention to adapt) on shapes with no magenta at all: the base, which has
   never seen the colour or the word. (The VAE, like SD's, is a codec for every colour: one trained
   without magenta decodes it as green, and no adapter on the U-Net could then draw it.)
2. Prompt fidelity (sdlite/fidelity.py: colour and shape read back from the pixels) of the base for
   "a magenta circle / square / triangle" and for the 15 pairs it knows.
3. configs/tiny-lora.yaml: a LoRA adapter trained on magenta shapes alone (with --replay N, plus N
   shapes of the known colours), base frozen.
4. The same fidelity with the adapter loaded (``pipe.load_lora_weights``), and at scale 0.

``--kind loha | lokr | dora`` trains LyCORIS' LoHa or LoKr, or DoRA, in place of the LoRA, with the same
rank, alpha, steps and rate (``--lora_type``, ``--lora_dora``); a LoHa or LoKr is merged when loaded, so
it has no scale-0 row. ``--kind textual_inversion`` trains a word ``<magenta>`` instead (its vectors
alone, the base untouched; the captions say the word) and asks for "a <magenta> circle". Each run also
reports its file's size and its seconds per step.

The in-suite version (tests/test_train_lora.py) is cut down to seconds and measures bits/dim instead.

What it measured, with the commands and the machine: benchmarks/RESULTS.md, "LoRA and DreamBooth".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NEW = "magenta"
WORD = "<magenta>"  # --kind textual_inversion's new word
SEEN = ["red", "green", "blue", "yellow", "cyan"]


def fidelity(pipe, colours: list[str], n: int, steps: int, guidance: float, scale: float | None = None,
             word: str | None = None):  # fmt: skip
    """Prompt fidelity over every shape in ``colours``; ``scale``: the adapters' strength; ``word``: a
    textual-inversion word said in the new colour's place (the checker still reads the colour)."""
    import torch

    from sdlite.data.shapes import SHAPES
    from sdlite.fidelity import prompt_fidelity

    prompts = [f"a {c} {s}" for c in colours for s in SHAPES]
    extra = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}

    def generate(asked, seed):
        asked = [p.replace(NEW, word) for p in asked] if word else asked
        generator = torch.Generator().manual_seed(seed)
        return list(pipe(list(asked), num_inference_steps=steps, guidance_scale=guidance,
                         generator=generator, output_type="np", **extra).images)  # fmt: skip

    report = prompt_fidelity(generate, prompts, n=n, seed=0)
    print(report.table(), flush=True)
    return {"fidelity": report.fidelity, "colour": sum(s.colour for s in report.scores) / len(prompts)}


def flags(**values) -> list[str]:
    """--key value flags for the trainers' own parsers."""
    return [t for k, v in values.items() for t in (f"--{k}", str(v))]


def mixed_data(out: Path, new: Path, known: Path, count: int) -> Path:
    """A folder with every image of ``new`` and the first ``count`` of ``known`` (both image folders)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    sources = [(new, None), (known, count)]
    for source, limit in sources:
        rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines()][:limit]
        for row in rows:
            name = f"{len(lines):06d}.png"
            shutil.copy(source / row["file_name"], out / name)
            lines.append(json.dumps({"file_name": name, "text": row["text"]}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lora-new-colour")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base_steps", type=int, default=900)
    parser.add_argument("--base_text_encoder_layers", type=int, default=2,
                        help="the base's text encoder (the tiny preset's 2; the demo recipe's 0 has no "
                             "attention for an adapter, and reads a token by its position)")  # fmt: skip
    parser.add_argument("--lora_steps", type=int, default=300)
    parser.add_argument("--n", type=int, default=8, help="images per prompt")
    parser.add_argument("--eval_steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0, help="the LoRA run's seed")
    parser.add_argument("--replay", type=int, default=0, help="images of the known colours mixed in")
    parser.add_argument("--word_init", default="red", help="textual inversion: the word its vectors start at")
    parser.add_argument("--word_lr", type=float, default=1e-2, help="textual inversion: the vectors' rate")
    kinds = ["lora", "loha", "lokr", "dora", "textual_inversion"]
    parser.add_argument("--kind", default="lora", choices=kinds,
                        help="the adapter: LoRA, LyCORIS' LoHa or LoKr, DoRA, or a new word")  # fmt: skip
    args = parser.parse_args()

    import torch

    from pipelines import TextToImagePipeline
    from sdlite.data.shapes import write_dataset
    from training import train, train_vae
    from training.config import parse_config
    from training.demo import recipe

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    seconds, results = {}, {}
    start = time.perf_counter()
    base_data = out / "data-no-magenta"
    new_data = out / "data-magenta"
    base_model = out / "base"
    if not (base_model / "model_index.json").is_file():
        write_dataset(base_data, count=2000, seed=0, exclude=[NEW], holdout=256)
        vae_data = write_dataset(out / "data-all", count=2000, seed=2, holdout=256)
        argv = flags(config=recipe("tiny-vae.yaml"), train_data_dir=vae_data / "train",
                     eval_data_dir=vae_data / "test", output_dir=out / "vae")  # fmt: skip
        vae = train_vae.train(parse_config(train_vae.VAETrainConfig, argv))
        seconds["vae"] = time.perf_counter() - start
        train.main(flags(config=recipe("tiny-shapes.yaml"), train_data_dir=base_data / "train",
                         text_encoder_layers=args.base_text_encoder_layers,
                         vae_path=vae["path"], output_dir=out / "base-run", final_dir=base_model,
                         cache_dir=out / "cache", max_steps=args.base_steps, lr_warmup_steps=50,
                         checkpoint_every=0, report_to="none"))  # fmt: skip
        seconds["base"] = time.perf_counter() - start - seconds["vae"]
    if not (new_data / "train" / "metadata.jsonl").is_file():
        write_dataset(new_data, count=256, seed=1, colours=[NEW], holdout=32)
    lora_data = new_data / "train"
    if args.replay:  # magenta and known colours together, so that the adapter has no reason to forget
        lora_data = mixed_data(out / f"data-magenta-replay{args.replay}", lora_data, base_data / "train",
                               args.replay)  # fmt: skip

    pipe = TextToImagePipeline.from_pretrained(base_model)
    pipe.set_progress_bar_config(disable=True)
    print("\n=== base ===")
    results["base"] = {
        NEW: fidelity(pipe, [NEW], args.n, args.eval_steps, args.guidance),
        "seen": fidelity(pipe, SEEN, max(1, args.n // 2), args.eval_steps, args.guidance),
    }

    t = time.perf_counter()
    # The saved base's own layer count: a base built by an earlier run may differ from this run's flag.
    base_layers = json.loads((base_model / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    run_name = f"seed{args.seed}" + (f"-replay{args.replay}" if args.replay else "")
    kind = {"loha": {"lora_type": "loha"}, "lokr": {"lora_type": "lokr"}, "dora": {"lora_dora": "true"}}
    if args.kind != "lora":
        run_name = f"{args.kind}-{run_name}"
    lora_dir = out / f"lora-{run_name}"
    common = dict(pretrained=base_model, val_data_dir=new_data / "test", output_dir=lora_dir,
                  cache_dir=out / "cache", max_steps=args.lora_steps, seed=args.seed,
                  report_to="none")  # fmt: skip
    if args.kind == "textual_inversion":  # the word in the colour's place in every caption
        word_data = mixed_data(out / "data-magenta-word", lora_data, lora_data, 0)
        metadata = word_data / "metadata.jsonl"
        metadata.write_text(metadata.read_text().replace(NEW, WORD))
        final = train.main(flags(train_data_dir=word_data, textual_inversion_token=WORD,
                                 textual_inversion_init=args.word_init, learning_rate=args.word_lr,
                                 train_batch_size=32, caption_dropout=0.1,
                                 lr_scheduler="constant_with_warmup", lr_warmup_steps=20,
                                 adam_weight_decay=0.0, max_grad_norm=1.0, snr_gamma=5.0,
                                 checkpoint_every=0, **{**common, "val_data_dir": "none"}))  # fmt: skip
    else:
        final = train.main(flags(config=recipe("tiny-lora.yaml"), train_data_dir=lora_data,
                                 lora_text_encoder=str(base_layers > 0).lower(), **common,
                                 **kind.get(args.kind, {})))  # fmt: skip
    seconds["lora"] = time.perf_counter() - t
    seconds["per_step"] = seconds["lora"] / args.lora_steps  # validation and saving included
    files = {f.name: f.stat().st_size for f in Path(final).glob("*.safetensors")}

    word = WORD if args.kind == "textual_inversion" else None
    if word:
        pipe.load_textual_inversion(Path(final) / "learned_embeds.safetensors")
    else:
        pipe.load_lora_weights(final, adapter_name="magenta")
    print("\n=== with the adapter ===")
    results["lora"] = {
        NEW: fidelity(pipe, [NEW], args.n, args.eval_steps, args.guidance, word=word),
        "seen": fidelity(pipe, SEEN, max(1, args.n // 2), args.eval_steps, args.guidance),
    }
    if args.kind in ("lora", "dora"):  # a LoHa or LoKr is merged into the weights: no run-time scale
        print("\n=== adapter at scale 0 ===")
        results["scale0"] = {NEW: fidelity(pipe, [NEW], args.n, args.eval_steps, args.guidance, scale=0.0)}
    results["seconds"], results["file_bytes"] = seconds, files
    (out / f"results-{run_name}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
