"""MixGRPO-style GRPO on FLUX.1-dev: HPS v2.1 and PickScore, a 4-step SDE window that moves over the 25 steps.

    accelerate launch recipes/grpo_flux.py [--sample.eta 0.7] [--sample.sde_window 0,4]

The setting of the MixGRPO paper (FLUX.1-dev, 25 steps, window of 4 moving one step later every 25 epochs, K = 12
images per prompt, Flow-GRPO's SDE with noise level 0.7, 720 px, distilled guidance 3.5), trained with LoRA on the
transformer's attention projections. PickScore (about 20) is weighted 1/100 so that both rewards move the
advantage (HPS v2.1 is about 0.3). Batch sizes are per process; each process samples whole groups.
"""

from pathlib import Path

from diffrl.cli import recipe_main
from diffrl.config import (
    FLUX_ATTENTION,
    Config,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    PromptConfig,
    RewardConfig,
    SampleConfig,
    TrainConfig,
)

PROMPTS = Path(__file__).resolve().parent / "prompts"  # found from any working directory


def config() -> Config:
    return Config(
        model=ModelConfig(
            family="flux",
            path="black-forest-labs/FLUX.1-dev",
            dtype="bfloat16",
            resolution=720,
            gradient_checkpointing=True,
        ),
        lora=LoraConfig(rank=32, alpha=32.0, target_modules=FLUX_ATTENTION),
        sample=SampleConfig(
            num_steps=25,
            guidance_scale=3.5,
            eta=0.7,
            noise_schedule="flow_grpo",
            sde_window=(0, 4),
            window_stride=1,
            window_shift_every=25,
            batch_size=12,
            num_batches_per_epoch=2,
        ),
        reward=RewardConfig(spec="hpsv2=1.0,pickscore=0.01"),
        prompts=PromptConfig(train=str(PROMPTS / "simple_animals.txt"), eval=str(PROMPTS / "simple_animals.txt")),
        train=TrainConfig(
            algorithm="grpo",
            epochs=300,
            lr=1e-5,
            batch_size=4,
            gradient_accumulation_steps=6,
            group_size=12,
            num_inner_epochs=1,
            clip_range=1e-4,
            adv_clip_max=5.0,
            timestep_fraction=1.0,
            mixed_precision="bf16",
        ),
        eval=EvalConfig(every_epochs=25, num_prompts=45, num_steps=25),
        logging=LoggingConfig(output_dir="runs/grpo_flux", checkpoint_every=25),
    )


if __name__ == "__main__":
    recipe_main(config)
