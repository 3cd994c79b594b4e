"""GRPO on the embedded tiny Stable Diffusion with the `shapes` verifier reward: runs on a laptop CPU.

python recipes/grpo_tiny.py [--sample.eta 1.2] [--train.seed 1]
accelerate launch recipes/grpo_tiny.py
"""

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


def config() -> Config:
    return Config(
        model=ModelConfig(family="sd", path="tiny"),
        lora=LoraConfig(rank=8, alpha=8.0),
        # only the first 8 of 20 steps are stochastic and trained: the layout (which shapes, where) is decided
        # there, so the reward's variance within a batch comes from the steps that are trained
        sample=SampleConfig(
            num_steps=20, guidance_scale=2.0, eta=1.0, sde_window=(0, 8), batch_size=32, num_batches_per_epoch=4
        ),
        reward=RewardConfig(spec="shapes"),
        prompts=PromptConfig(train="tiny:train", eval="tiny:heldout"),
        train=TrainConfig(
            algorithm="grpo",
            epochs=30,
            lr=1e-3,
            batch_size=32,
            gradient_accumulation_steps=4,  # one update per epoch over 32 prompts x 4 images
            group_size=4,
            num_inner_epochs=1,
            clip_range=1e-2,
            timestep_fraction=0.5,
        ),
        eval=EvalConfig(every_epochs=5, num_prompts=64, num_steps=20),
        logging=LoggingConfig(output_dir="runs/grpo_tiny", checkpoint_every=5),
    )


if __name__ == "__main__":
    recipe_main(config)
