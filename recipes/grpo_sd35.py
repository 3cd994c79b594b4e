"""Flow-GRPO on Stable Diffusion 3.5 Medium: the GenEval setting of the Flow-GRPO paper and repository.

    accelerate launch recipes/grpo_sd35.py [--reward.spec http://HOST:PORT] [--model.path /local/sd35m]

Where each value comes from (yifan123/flow_grpo, ``config/grpo.py:geneval_sd3`` over ``config/base.py``, and
``scripts/train_sd3.py``):

- SD3.5 Medium, 512 px, 10 training steps, guidance 4.5, Flow-GRPO's SDE with noise level 0.7 on every step
  (``sample.noise_level``), the evaluation at 40 steps (``eval_num_steps``);
- 24 images per prompt, advantages scaled by the std of the whole batch (``global_std``), clipped at 5, clip range
  1e-4, KL to the reference 0.04 for GenEval (``train.beta``; 0.01 for PickScore in ``pickscore_sd3``, the
  default reward here, so 0.01 below), learning rate 3e-4, AdamW (0.9, 0.999), weight decay 1e-4,
  eps 1e-8, gradient norm 1, one inner epoch, 99% of the timesteps trained;
- LoRA r = 32, alpha = 64 on the eight attention projections of every block (train_sd3.py); T5 prompts cut at 128
  tokens.
- Batch: Flow-GRPO samples 48 prompts x 24 images an epoch on 32 GPUs (9 images a GPU, 4 batches) and steps twice.
  Here the batch sizes are per process: 24 images (one group) a batch, 2 batches, one optimizer step a batch; on
  32 processes that is 64 prompts an epoch. Set ``--sample.num_batches_per_epoch`` to match your process count.

Not carried over: Flow-GRPO's EMA of the LoRA weights (decay 0.9 every 8 steps; diffrl has no EMA) and its reward
(GenEval runs as a separate server: serve it with ``diffrl serve-reward`` and pass its URL as ``--reward.spec``
with ``--train.kl_coef 0.04``; the default here is PickScore, Flow-GRPO's human-preference task).
Not confirmed: the mixed precision of the paper's runs (the base config says fp16; bf16 is used here).
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
            family="sd3",
            path="stabilityai/stable-diffusion-3.5-medium",
            dtype="bfloat16",
            resolution=512,
            max_sequence_length=128,
            gradient_checkpointing=True,
        ),
        lora=LoraConfig(rank=32, alpha=64.0, target_modules=FLUX_ATTENTION),
        sample=SampleConfig(
            num_steps=10,
            guidance_scale=4.5,
            eta=0.7,
            noise_schedule="flow_grpo",
            batch_size=24,
            num_batches_per_epoch=2,
        ),
        reward=RewardConfig(spec="pickscore"),
        prompts=PromptConfig(train=str(PROMPTS / "simple_animals.txt"), eval=str(PROMPTS / "simple_animals.txt")),
        train=TrainConfig(
            algorithm="grpo",
            epochs=1000,
            lr=3e-4,
            weight_decay=1e-4,
            adam_eps=1e-8,
            max_grad_norm=1.0,
            batch_size=4,
            gradient_accumulation_steps=6,
            group_size=24,
            advantage_scale="batch",
            num_inner_epochs=1,
            clip_range=1e-4,
            adv_clip_max=5.0,
            timestep_fraction=0.99,
            kl_coef=0.01,
            mixed_precision="bf16",
        ),
        eval=EvalConfig(every_epochs=60, num_prompts=45, num_steps=40),
        logging=LoggingConfig(output_dir="runs/grpo_sd35", checkpoint_every=60),
    )


if __name__ == "__main__":
    recipe_main(config)
