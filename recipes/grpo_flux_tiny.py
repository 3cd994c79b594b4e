"""GRPO on the embedded tiny FLUX with the `shapes` verifier reward and a MixGRPO-style SDE window: runs on a CPU.

python recipes/grpo_flux_tiny.py [--sample.eta 1.2] [--sample.sde_window 0,20]
accelerate launch recipes/grpo_flux_tiny.py
"""

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


def config() -> Config:
    return Config(
        model=ModelConfig(family="flux", path="tiny"),
        lora=LoraConfig(rank=8, alpha=8.0, target_modules=FLUX_ATTENTION),
        # a window of 4 of the 20 steps is stochastic and trained; it moves 2 steps later every 10 epochs
        sample=SampleConfig(
            num_steps=20,
            guidance_scale=2.0,
            eta=1.0,
            sde_window=(0, 4),
            window_stride=2,
            window_shift_every=10,
            batch_size=32,
            num_batches_per_epoch=4,
        ),
        reward=RewardConfig(spec="shapes"),
        prompts=PromptConfig(train="tiny:train", eval="tiny:heldout"),
        train=TrainConfig(
            algorithm="grpo",
            epochs=30,
            lr=1e-3,
            batch_size=32,
            gradient_accumulation_steps=4,
            group_size=4,
            num_inner_epochs=1,
            clip_range=1e-2,
            timestep_fraction=1.0,
        ),
        eval=EvalConfig(every_epochs=5, num_prompts=64, num_steps=20),
        logging=LoggingConfig(output_dir="runs/grpo_flux_tiny", checkpoint_every=5),
    )


if __name__ == "__main__":
    recipe_main(config)
