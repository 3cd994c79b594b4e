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
        # only the first 8 of 20 steps are stochastic and trained: the layout (which shapes, where) is decided
        # there, so the reward's variance within a batch comes from the steps that are trained
        sample=SampleConfig(
            num_steps=20, guidance_scale=2.0, eta=1.0, sde_window=(0, 8), batch_size=32, num_batches_per_epoch=2
        ),
        reward=RewardConfig(spec="shapes"),
        # 32 fixed training prompts (8 of each kind, drawn from tiny:train), so that every prompt is seen about twice
        # an epoch and its own reward statistics (the per-prompt buffer) replace the batch's after two epochs
        prompts=PromptConfig(train=str(PROMPTS / "shapes_train32.txt"), eval="tiny:heldout"),
        train=TrainConfig(
            algorithm="ddpo_is",
            epochs=40,
            lr=1.5e-3,
            lr_schedule="cosine",
            batch_size=32,
            num_inner_epochs=1,
            clip_range=1e-2,
            timestep_fraction=0.5,
            stat_buffer_size=16,
            stat_min_count=4,
        ),
        eval=EvalConfig(every_epochs=5, num_prompts=64, num_steps=20),
        logging=LoggingConfig(output_dir="runs/ddpo_tiny", checkpoint_every=5),
    )


if __name__ == "__main__":
    recipe_main(config)
