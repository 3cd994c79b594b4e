"""DDPO-IS on Stable Diffusion XL (base 1.0) with the LAION aesthetic reward, at 1024 px in bf16.

    accelerate launch recipes/ddpo_sdxl.py [--sample.eta 1.2] [--reward.spec pickscore] [--model.path /local/sdxl]

The DDPO paper's aesthetic setting (DDPO-IS, eta 1, clip range 1e-4, advantages clipped at 5, per-prompt
statistics) carried to SDXL: 40 DDIM steps and guidance 5.0 as SDXL's own examples sample, LoRA rank 8 on the
UNet's attention projections, gradient checkpointing, the frozen weights in bf16 and the VAE in float32 (SDXL's VAE
overflows in half precision; ``--model.vae madebyollin/sdxl-vae-fp16-fix`` runs a fixed one in bf16). No published
DDPO run on SDXL exists to copy: the sampler and batch settings are DDPO's, the rest SDXL's defaults. Batch sizes
are per process (``accelerate launch --multi_gpu --num_processes N`` runs N data-parallel processes). Needs the
SDXL weights and the aesthetic reward's weights.
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
        model=ModelConfig(
            family="sdxl",
            path="stabilityai/stable-diffusion-xl-base-1.0",
            dtype="bfloat16",
            resolution=1024,
            gradient_checkpointing=True,
        ),
        lora=LoraConfig(rank=8, alpha=8.0),
        sample=SampleConfig(num_steps=40, guidance_scale=5.0, eta=1.0, batch_size=4, num_batches_per_epoch=8),
        reward=RewardConfig(spec="aesthetic"),
        prompts=PromptConfig(train=str(PROMPTS / "simple_animals.txt"), eval=str(PROMPTS / "simple_animals.txt")),
        train=TrainConfig(
            algorithm="ddpo_is",
            epochs=100,
            lr=3e-4,
            batch_size=2,
            gradient_accumulation_steps=8,
            num_inner_epochs=1,
            clip_range=1e-4,
            adv_clip_max=5.0,
            timestep_fraction=1.0,
            mixed_precision="bf16",
        ),
        eval=EvalConfig(every_epochs=10, num_prompts=45, num_steps=40),
        logging=LoggingConfig(output_dir="runs/ddpo_sdxl", checkpoint_every=10),
    )


if __name__ == "__main__":
    recipe_main(config)
