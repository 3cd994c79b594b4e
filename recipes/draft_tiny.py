"""DRaFT-K on the embedded tiny Stable Diffusion with the learned shapes reward, watched by the verifier.

python recipes/draft_tiny.py [--train.draft_k 2] [--train.kl_coef 0.1] [--train.seed 1]

The reward is ``shapes_learned`` (a small scorer trained to predict the verifier, with gradients to the image) and the
verifier ``shapes`` rides along with weight 0: it is scored and logged (``reward/shapes/mean``, and at every
evaluation ``eval/shapes/ode/mean`` beside ``eval/shapes_learned/ode/mean``) but not trained on, so a run shows where
the proxy keeps rising while the true reward stops or falls (over-optimisation). ``--train.kl_coef`` keeps the
trained steps' outputs near the base model's.
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
        # DRaFT samples with the ODE (eta 0) and back-propagates through the last K steps and the VAE decode
        sample=SampleConfig(num_steps=20, guidance_scale=2.0, eta=0.0, batch_size=32, num_batches_per_epoch=4),
        reward=RewardConfig(spec="shapes_learned,shapes=0"),
        prompts=PromptConfig(train=str(PROMPTS / "shapes_train32.txt"), eval="tiny:heldout"),
        train=TrainConfig(algorithm="draft", epochs=30, lr=1e-3, lr_schedule="constant", draft_k=2),
        eval=EvalConfig(every_epochs=5, num_prompts=64, num_steps=20),
        logging=LoggingConfig(output_dir="runs/draft_tiny", checkpoint_every=5),
    )


if __name__ == "__main__":
    recipe_main(config)
