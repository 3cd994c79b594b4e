"""Training-step cost: seconds per trained step and peak memory, by batch, gradient checkpointing, resolution and
trained steps per sample (and with channels-last, and compiled), through the trainer's own loss
(``Trainer.step_loss``) and backward.

    python scripts/bench_train_step.py [--model tiny] [--batches 1,4,8,16] [--resolutions 0,128]
        [--trained-steps 5,10,20] [--repeats 5] [--device cpu|cuda] [--dtype float32] [--compile] [--json out.json]

A "trained step" is one forward and backward of a micro-batch of B samples at one of their denoising steps (with
classifier-free guidance, so the network sees 2B inputs); DDPO/GRPO run ``trained steps per sample`` of them per
micro-batch. Each configuration runs in its own process, so its peak memory is its own: CUDA's peak allocated
memory on a GPU; on a CPU the rise of the process's peak resident memory over what it held before the timed steps.
Times are medians of ``--repeats`` after one warm-up step; "ms per sample-step" is the step time / B.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffrl.config import Config, apply_overrides


def rss_bytes() -> int:
    """The process's current resident memory."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(spec: dict) -> dict:
    from diffrl.trainers import make_trainer

    device_is_cuda = spec["device"] == "cuda"
    batch = spec["batch"]
    with tempfile.TemporaryDirectory() as out:
        config = apply_overrides(
            Config(),
            [
                "--model.path", spec["model"], "--model.dtype", spec["dtype"],
                "--model.resolution", str(spec["resolution"]),
                "--model.gradient_checkpointing", str(spec["checkpointing"]).lower(),
                "--model.compile", str(spec["compile"]).lower(),
                "--model.channels_last", str(spec["channels_last"]).lower(),
                "--sample.num_steps", str(spec["num_steps"]), "--sample.guidance_scale", "2.0",
                "--sample.eta", "1.0", "--sample.batch_size", str(batch), "--sample.num_batches_per_epoch", "1",
                "--train.batch_size", str(batch), "--train.algorithm", "ddpo_is", "--train.lr", "1e-4",
                "--reward.spec", "jpeg_compressibility", "--eval.every_epochs", "0",
                "--logging.output_dir", out, "--logging.progress_bars", "false",
            ],
        )  # fmt: skip
        trainer = make_trainer(config)
        samples = trainer.sample_epoch(0, trainer.epoch_sampler(0))
        rows = torch.arange(batch)
        advantages = torch.randn(batch, device=trainer.accelerator.device)
        trainer.policy.denoiser.train()
        trained = spec["trained_steps"]

        def one_sample_pass() -> None:
            """What training does for one micro-batch: ``trained`` forward/backward steps, then the update."""
            for k in range(trained):
                steps = torch.full((batch,), (k * spec["num_steps"]) // trained)
                loss, _, _ = trainer.step_loss(samples, rows, steps, advantages)
                trainer.accelerator.backward(loss.loss / trained)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        sync = torch.cuda.synchronize if device_is_cuda else (lambda: None)
        one_sample_pass()  # warm-up (and compilation)
        sync()
        if device_is_cuda:
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        else:
            held = rss_bytes()
        times = []
        for _ in range(spec["repeats"]):
            started = time.perf_counter()
            one_sample_pass()
            sync()
            times.append((time.perf_counter() - started) / trained)
        if device_is_cuda:
            peak = torch.cuda.max_memory_allocated() - held
        else:
            peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - held)
        trainer.finish()
    step_s = statistics.median(times)
    return {**spec, "step_s": step_s, "ms_per_sample_step": 1000 * step_s / batch, "peak_extra_mib": peak / 2**20}


def run(spec: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"configuration {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--resolutions", default="0,128", help="image sides in pixels; 0 is the model's default")
    parser.add_argument("--trained-steps", default="5,10,20", help="trained steps per sample (of 20 sampling steps)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true", help="also run the base configuration with torch.compile")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    base = {
        "model": args.model, "device": args.device, "dtype": args.dtype, "resolution": 0, "checkpointing": False,
        "compile": False, "channels_last": False, "batch": 8, "num_steps": 20, "trained_steps": 10,
        "repeats": args.repeats,
    }  # fmt: skip
    specs = [base]  # the reference of every ratio
    batches, resolutions = map(int, args.batches.split(",")), map(int, args.resolutions.split(","))
    specs += [base | {"batch": b, "checkpointing": c} for b in batches for c in (False, True)]
    specs += [base | {"resolution": r} for r in resolutions if r]
    specs += [base | {"trained_steps": t} for t in map(int, args.trained_steps.split(","))]
    specs.append(base | {"channels_last": True})
    if args.compile:
        specs.append(base | {"compile": True})
    specs = [spec for i, spec in enumerate(specs) if spec not in specs[:i]]
    results = []
    for spec in specs:
        results.append(run(spec))
        r = results[-1]
        print(
            f"batch {r['batch']:>3} res {r['resolution'] or 'default':>7} ckpt {r['checkpointing']!s:>5} "
            f"NHWC {r['channels_last']!s:>5} compile {r['compile']!s:>5} trained {r['trained_steps']:>2}: "
            f"{r['step_s']:.3f} s/step "
            f"{r['ms_per_sample_step']:.1f} ms/sample-step, peak +{r['peak_extra_mib']:.0f} MiB",
            flush=True,
        )
    reference = results[0]
    print(f"\n{args.model} on {args.device} ({args.dtype}); ratios against batch {base['batch']}, default resolution,")
    print("no checkpointing, contiguous (NCHW), 10 of 20 steps trained, measured in this run")
    print("| batch | resolution | grad. checkpointing | channels-last | compile | trained steps/sample | "
          "s per trained step | ms per sample-step | time vs ref | peak extra MiB | memory vs ref |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        memory = r["peak_extra_mib"] / reference["peak_extra_mib"] if reference["peak_extra_mib"] else float("nan")
        print(
            f"| {r['batch']} | {r['resolution'] or 'default'} | {'yes' if r['checkpointing'] else 'no'} | "
            f"{'yes' if r['channels_last'] else 'no'} | {'yes' if r['compile'] else 'no'} | "
            f"{r['trained_steps']} | {r['step_s']:.3f} | "
            f"{r['ms_per_sample_step']:.1f} | {r['step_s'] / reference['step_s']:.2f} | "
            f"{r['peak_extra_mib']:.0f} | {memory:.2f} |"
        )
    if args.json:
        settings = vars(args) | {"json": str(args.json)}
        args.json.write_text(json.dumps({"settings": settings, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
