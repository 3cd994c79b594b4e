"""DDPO-IS on Stable Diffusion 1.5 with the LAION aesthetic reward: the DDPO paper's aesthetic-quality setting.

    accelerate launch recipes/ddpo_sd15.py [--sample.eta 1.2] [--model.path /local/sd15]

Batch sizes are per process (the paper used 8 GPUs: 256 samples per epoch). Needs the SD1.5 weights (hub id or a
local copy) and the aesthetic reward's weights (``--reward.kwargs '{"aesthetic": {"model_dir": ...}}'``).
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
        lora=LoraConfig(rank=4, alpha=4.0),
        sample=SampleConfig(num_steps=50, guidance_scale=5.0, eta=1.0, batch_size=8, num_batches_per_epoch=4),
        reward=RewardConfig(spec="aesthetic"),
        prompts=PromptConfig(train=str(PROMPTS / "simple_animals.txt"), eval=str(PROMPTS / "simple_animals.txt")),
        train=TrainConfig(
            algorithm="ddpo_is",
            epochs=100,
            lr=3e-4,
            batch_size=4,
            gradient_accumulation_steps=2,
            num_inner_epochs=1,
            clip_range=1e-4,
            adv_clip_max=5.0,
            timestep_fraction=1.0,
            mixed_precision="fp16",
        ),
        eval=EvalConfig(every_epochs=10, num_prompts=45, num_steps=50),
        logging=LoggingConfig(output_dir="runs/ddpo_sd15", checkpoint_every=10),
    )


if __name__ == "__main__":
    recipe_main(config)
