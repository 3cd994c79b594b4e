"""GRPO on Stable Diffusion 1.5 with the LAION aesthetic reward: K = 8 images per prompt, PPO clipping.

    accelerate launch recipes/grpo_sd15.py [--sample.eta 1.2] [--train.group_size 8]

Batch sizes are per process; each process samples whole groups.
"""

from pathlib import Path

from diffrl.cli import recipe_main
from diffrl.config import (
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
        model=ModelConfig(family="sd", path="stable-diffusion-v1-5/stable-diffusion-v1-5", dtype="float16"),
        lora=LoraConfig(rank=8, alpha=8.0),
        sample=SampleConfig(num_steps=20, guidance_scale=5.0, eta=1.0, batch_size=16, num_batches_per_epoch=2),
        reward=RewardConfig(spec="aesthetic"),
        prompts=PromptConfig(train=str(PROMPTS / "simple_animals.txt"), eval=str(PROMPTS / "simple_animals.txt")),
        train=TrainConfig(
            algorithm="grpo",
            epochs=100,
            lr=1e-4,
            batch_size=8,
            group_size=8,
            num_inner_epochs=1,
            clip_range=1e-4,
            timestep_fraction=0.6,
            mixed_precision="fp16",
        ),
        eval=EvalConfig(every_epochs=10, num_prompts=45, num_steps=20),
        logging=LoggingConfig(output_dir="runs/grpo_sd15", checkpoint_every=10),
    )


if __name__ == "__main__":
    recipe_main(config)
