"""GRPO on the embedded tiny Stable Diffusion with the `shapes` verifier reward: runs on a laptop CPU.

python recipes/grpo_tiny.py [--sample.eta 1.2] [--train.seed 1]
accelerate launch recipes/grpo_tiny.py
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
        # steps 2-4 of 20 are stochastic and all three trained: on the embedded world they decide whether a sample
        # follows its prompt or draws another scene (scripts/reward_variance.py), the first step's noise is a new
        # initial noise the policy cannot move, and the last steps decide nothing (docs/learning.md); no guidance,
        # so that what the policy learns is what guidance would otherwise buy
        sample=SampleConfig(
            num_steps=20, guidance_scale=1.0, eta=1.0, sde_window=(2, 5), batch_size=32, num_batches_per_epoch=4
        ),
        reward=RewardConfig(spec="shapes"),
        # 32 fixed training prompts (8 of each kind, from tiny:train); an epoch draws 16 (with replacement)
        prompts=PromptConfig(train=str(PROMPTS / "shapes_train32.txt"), eval="tiny:heldout"),
        train=TrainConfig(
            algorithm="grpo",
            epochs=20,
            lr=4e-3,
            lr_schedule="constant",
            batch_size=16,
            gradient_accumulation_steps=8,  # one update per epoch over 16 prompts x 8 images
            group_size=8,
            num_inner_epochs=1,
            clip_range=1e-2,
            timestep_fraction=1.0,
        ),
        eval=EvalConfig(every_epochs=10, num_prompts=64, num_steps=20),
        logging=LoggingConfig(output_dir="runs/grpo_tiny", checkpoint_every=10),
    )


if __name__ == "__main__":
    recipe_main(config)
