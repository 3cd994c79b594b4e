"""DDPO-IS on the embedded tiny Stable Diffusion with the `shapes` verifier reward: runs on a laptop CPU.

python recipes/ddpo_tiny.py [--sample.eta 1.2] [--train.algorithm ddpo_sf]
accelerate launch recipes/ddpo_tiny.py
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
        model=ModelConfig(family="sd", path="tiny"),
        lora=LoraConfig(rank=8, alpha=8.0),
        # steps 2-4 of 20 are stochastic and trained, without guidance, as in recipes/grpo_tiny.py: on the embedded
        # world they decide whether a sample follows its prompt (scripts/reward_variance.py)
        sample=SampleConfig(
            num_steps=20, guidance_scale=1.0, eta=1.0, sde_window=(2, 5), batch_size=32, num_batches_per_epoch=4
        ),
        reward=RewardConfig(spec="shapes"),
        # 32 fixed training prompts (8 of each kind, drawn from tiny:train): an epoch of 128 images sees each about
        # four times, so that a prompt's own reward statistics (the per-prompt buffer) replace the batch's early
        prompts=PromptConfig(train=str(PROMPTS / "shapes_train32.txt"), eval="tiny:heldout"),
        train=TrainConfig(
            algorithm="ddpo_is",
            epochs=20,
            lr=4e-3,
            lr_schedule="constant",
            batch_size=32,
            gradient_accumulation_steps=4,  # one update per epoch over its 128 images
            num_inner_epochs=1,
            clip_range=1e-2,
            timestep_fraction=1.0,
            stat_buffer_size=16,
            stat_min_count=4,
        ),
        eval=EvalConfig(every_epochs=10, num_prompts=64, num_steps=20),
        logging=LoggingConfig(output_dir="runs/ddpo_tiny", checkpoint_every=10),
    )


if __name__ == "__main__":
    recipe_main(config)
