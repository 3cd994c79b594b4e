"""Sampler overhead: a diffrl rollout (with log-probabilities) against the plain diffusers pipeline call.

    python scripts/bench_sampler.py [--family sd,flux] [--batch 16] [--steps 20] [--guidance 2.0] [--repeats 5]
        [--model-sd DIR] [--model-flux DIR] [--device cpu|cuda] [--channels-last 0|1]
        [--json out.json]

Same model (the pipeline is assembled from the policy's own networks, LoRA included), prompts, seeds, steps and
guidance; the pipeline runs DDIM (SD) or the flow Euler ODE (FLUX, true CFG
against the empty prompt when the model has no guidance embedding). The rollout runs at eta = 0 (the same ODE; its
images are checked against the pipeline's) and at eta = 1 (every step stochastic, log-probabilities recorded).
Each figure is the median of ``--repeats`` interleaved timed calls after a warm-up; ratios are rollout / pipeline
from this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from diffrl import policies
from diffrl.config import Config, ModelConfig
from diffrl.sampling.rollout import rollout
from diffrl.tiny import tiny_model_path

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three purple circles"]


def timed(fns: dict, repeats: int, sync) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of each function; the calls are interleaved (A B C A B C ...) after one warm-up each, so
    that a change in machine load affects every function alike."""
    outs = {name: fn() for name, fn in fns.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            started = time.perf_counter()
            outs[name] = fn()
            sync()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def bench(family: str, path: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    seeds = list(range(args.batch))
    model = ModelConfig(family=family, path=path, channels_last=bool(args.channels_last))
    config = Config(model=model)
    policy = policies.load(config, device)
    # the pipeline runs the policy's own networks (the LoRA-adapted UNet/transformer, in the policy's memory format)
    if family == "flux":
        pipeline = policy.pipeline
        size = policy.resolution
        guidance = (
            {"guidance_scale": args.guidance}
            if policy.guidance_embeds
            else {"true_cfg_scale": args.guidance, "negative_prompt": ""}
        )
        extra = {"height": size, "width": size, "max_sequence_length": policy.max_sequence_length, **guidance}
    else:
        pipeline = StableDiffusionPipeline(
            vae=policy.vae,
            text_encoder=policy.text_encoder,
            tokenizer=policy.tokenizer,
            unet=policy.unet,
            scheduler=DDIMScheduler.from_config(policy.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        extra = {"guidance_scale": args.guidance, "eta": 0.0}
    pipeline.set_progress_bar_config(disable=True)

    def plain():
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            return pipeline(
                prompts, num_inference_steps=args.steps, generator=generators, output_type="pt", **extra
            ).images

    def ours(eta: float):
        return lambda: (
            rollout(policy, prompts, seeds, eta=eta, num_steps=args.steps, guidance_scale=args.guidance).images
        )

    seconds, outs = timed({"pipeline": plain, "ode": ours(0.0), "sde": ours(1.0)}, args.repeats, sync)
    pipeline_s, ode_s, sde_s = seconds["pipeline"], seconds["ode"], seconds["sde"]
    reference, ode_images = outs["pipeline"], outs["ode"]
    return {
        "family": family,
        "model": path,
        "pipeline_s": pipeline_s,
        "rollout_eta0_s": ode_s,
        "rollout_eta1_s": sde_s,
        "ratio_eta0": ode_s / pipeline_s,
        "ratio_eta1": sde_s / pipeline_s,
        "max_abs_image_diff_eta0": (ode_images.cpu() - reference.cpu()).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd,flux")
    parser.add_argument("--model-sd", default=None, help="SD model directory or hub id (default: the tiny SD)")
    parser.add_argument("--model-flux", default=None, help="FLUX model directory or hub id (default: the tiny FLUX)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", type=int, choices=(0, 1), default=0, help="model.channels_last (SD)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for family in args.family.split(","):
        path = getattr(args, f"model_{family}") or str(tiny_model_path(family))
        rows.append(bench(family, path, args))
    print(
        f"\n{args.batch} images, {args.steps} steps, guidance {args.guidance}, {args.device}; median of {args.repeats}"
    )
    print("| model | pipeline s | rollout eta=0 s (ratio) | rollout eta=1 s (ratio) | max image diff at eta=0 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['family']} ({Path(r['model']).name}) | {r['pipeline_s']:.3f} | {r['rollout_eta0_s']:.3f} "
            f"({r['ratio_eta0']:.3f}x) | {r['rollout_eta1_s']:.3f} ({r['ratio_eta1']:.3f}x) | "
            f"{r['max_abs_image_diff_eta0']:.1e} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
