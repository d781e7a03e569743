"""The demo's model against its LCM-LoRA: fidelity, diversity and images per second at 1-8 steps.

    sdlite train --config demo-lcm                  # the LCM-LoRA (configs/demo-lcm.yaml)
    python benchmarks/lcm_demo.py --model runs/demo/model --lora runs/demo-lcm/final \\
        --data runs/demo/data/test --seeds 0 1 2 --json runs/demo-lcm/bench.json

1. The teacher as `sdlite evaluate` samples it: 50 DDPM steps, guidance 2 at t <= 300.
2. The same model with the LCM-LoRA and LCMScheduler at 1, 2, 4 and 8 steps, without guidance; and,
   for reference, the teacher itself in 4 DDIM steps with its guidance.
Each by ``run_evaluation`` (the reader behind `sdlite evaluate`: colour and shape read back from the
pixels, over the seen pairs and the never-seen "red circle", and the diversity against --data's
spread), at every seed. Images per second are timed apart, all settings in turns in one process (the
best of --repeats, as the machine is shared), on one batch of every prompt, the LCM-LoRA fused into
the weights (``fuse_lora``): what a user serving it waits for.

What it measured, with the machine: benchmarks/RESULTS.md, "Four steps instead of fifty".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHER = dict(steps=50, guidance=2.0, guidance_interval=(0.0, 300.0), scheduler="ddpm")
STUDENT_STEPS = (1, 2, 4, 8)


def settings(lora: str, timesteps: list[int] | None = None) -> dict[str, dict]:
    """name -> run_evaluation's sampler arguments: the teacher, then the LCM-LoRA at each step count, and
    at ``timesteps`` (LCMScheduler's own otherwise: 999, 759, 499, 259 for 4 steps)."""
    student = dict(guidance=1.0, guidance_interval=None, scheduler="lcm", loras=[(lora, 1.0)])
    ddim = dict(TEACHER, steps=4, scheduler="ddim")  # the teacher's own few-step sampling, for reference
    runs = {"teacher-50": dict(TEACHER), "teacher-ddim-4": ddim,
            **{f"lcm-{n}": dict(student, steps=n) for n in STUDENT_STEPS}}  # fmt: skip
    if timesteps:
        runs[f"lcm-t{timesteps[0]}"] = dict(student, steps=len(timesteps), timesteps=timesteps)
    return runs


def images_per_second(
    model: str, runs: dict[str, dict], prompts: list[str], repeats: int, fuse: bool = True
) -> dict[str, float]:
    """Images per second of each setting over one batch of ``prompts`` (one image each), best of
    ``repeats`` rounds that take every setting in turn."""
    import torch

    from training.cmd_generate import load_loras, load_pipeline, set_scheduler

    pipes = {}
    for name, run in runs.items():
        pipe = load_pipeline(model)
        load_loras(pipe, run.get("loras", []))
        if run.get("loras") and fuse:
            pipe.fuse_lora()  # as a user serving one adapter would: no adapter layers left to run
        set_scheduler(pipe, run["scheduler"])
        pipes[name] = pipe
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            pipes[name](prompts, num_inference_steps=run["steps"], timesteps=run.get("timesteps"),
                        guidance_scale=run["guidance"],
                        guidance_interval=run["guidance_interval"], output_type="np",
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(prompts) / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the teacher's folder (the demo's model)")
    parser.add_argument("--lora", required=True, help="the LCM-LoRA (its final/ folder or file)")
    parser.add_argument("--data", required=True, help="held-out images: the diversity's reference")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n", type=int, default=8, help="images per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no_fuse", action="store_true", help="time the LCM-LoRA unfused, as --lora runs it")
    parser.add_argument("--students_only", action="store_true", help="evaluate the LCM-LoRA's rows alone")
    parser.add_argument("--timesteps", type=int, nargs="+", default=None,
                        help="the LCM-LoRA at these timesteps too, high to low")  # fmt: skip
    args = parser.parse_args()
    import torch

    from training.cmd_evaluate import evaluation_prompts, run_evaluation

    torch.set_num_threads(args.threads)
    runs = settings(args.lora, args.timesteps)
    speed = images_per_second(
        args.model, runs, evaluation_prompts(None, None) * 4, args.repeats, not args.no_fuse
    )
    results = {name: {"images_per_s": speed[name], "seeds": {}} for name in runs}
    evaluated = {k: v for k, v in runs.items() if k.startswith("lcm") or not args.students_only}
    for seed in args.seeds:
        for name, run in evaluated.items():
            # no round trip: the VAE's own figure, the same for every setting
            report = run_evaluation(args.model, n=args.n, seed=seed, unseen=["red circle"], data=args.data,
                                    bpd_count=2, stride=500, bpd_draws=1, round_trip=False,
                                    **run)  # fmt: skip
            keep = ("fidelity", "fidelity_seen", "fidelity_unseen", "fidelity_strict", "diversity")
            results[name]["seeds"][seed] = {k: report[k] for k in keep}
            print(name, seed, results[name]["seeds"][seed], flush=True)
    print(f"{'setting':<12} {'seen':>7} {'unseen':>7} {'strict':>7} {'diversity':>9} {'images/s':>9}  (mean)")
    for name, result in results.items():
        if not result["seeds"]:
            continue
        per_seed = result["seeds"].values()
        mean = {
            k: sum(s[k] for s in per_seed) / len(per_seed)
            for k in ("fidelity_seen", "fidelity_unseen", "fidelity_strict", "diversity")
        }
        result["mean"] = mean
        figures = [f"{mean[k]:>7.1%}" for k in ("fidelity_seen", "fidelity_unseen", "fidelity_strict")]
        print(f"{name:<12} {' '.join(figures)} {mean['diversity']:>9.3f} {result['images_per_s']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
