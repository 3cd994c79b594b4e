"""Run configuration: nested dataclasses with help text and units, validated where they are built.

Every field is settable from the command line with a dotted key (``--sample.eta 1.2``, ``--train.lr=3e-4``);
unknown keys and values of the wrong type are errors that say what to change. The resolved config is saved as
``config.json`` with every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")  # config files `diffrl train` takes in place of a recipe
MIN_TRAINING_ETA = 1e-3  # below it a training step's log-probability is float32 rounding noise


class ConfigError(ValueError):
    """A config value that cannot be used; the message says what to change."""


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


FAMILIES = ("sd", "sdxl", "sd3", "flux")
ALGORITHM_NAMES = {"ddpo_sf": "DDPO-SF", "ddpo_is": "DDPO-IS", "grpo": "GRPO", "nft": "DiffusionNFT", "draft": "DRaFT"}
VP_FAMILIES = ("sd", "sdxl")  # the others are rectified-flow models


@dataclass
class ModelConfig:
    family: Literal["sd", "sdxl", "sd3", "flux"] = _help(
        "model family: 'sd' (SD1.x/2.x layout), 'sdxl' (Stable Diffusion XL), 'sd3' (SD3 / SD3.5) or 'flux' (FLUX.1)",
        default="sd",
    )
    path: str = _help(
        "local directory or hub id of a diffusers-layout model; 'tiny' is the embedded one", default="tiny"
    )
    revision: str | None = _help("hub revision (branch, tag or commit) when path is a hub id", default=None)
    dtype: Literal["float32", "bfloat16", "float16"] = _help(
        "dtype of the frozen weights (VAE, text encoders, base UNet); LoRA weights stay float32", default="float32"
    )
    gradient_checkpointing: bool = _help("recompute activations in the backward pass to save memory", default=False)
    full_finetune: bool = _help("train every UNet/transformer weight instead of LoRA", default=False)
    init_weights: str = _help(
        "folder of trained weights to start from: a LoRA of this model with the same lora settings (a "
        "save_adapter folder or a run's checkpoint) or, with full_finetune, a fine-tuned network; the reference "
        "policy (train.kl_coef) stays the model at path; a resumed run restores its checkpoint instead ('': start "
        "from the base model)",
        default="",
    )
    channels_last: bool = _help(
        "SD: keep the UNet's weights channels-last (NHWC); whether it is faster depends on the hardware and batch "
        "(docs/performance.md)",
        default=False,
    )
    compile: bool = _help(
        "torch.compile the UNet/transformer: faster steps after a one-off compile per shape (minutes on a CPU)",
        default=False,
    )
    resolution: int = _help(
        "image side in pixels; 0: the model's default (SD: the UNet's sample size x 8; FLUX: the VAE's sample size)",
        default=0,
    )
    max_sequence_length: int = _help(
        "FLUX: T5 prompt tokens; 0: the T5 tokenizer's model_max_length, at most 512 (FLUX.1-dev: 512)", default=0
    )
    t5: bool = _help("SD3: load the T5 text encoder (false: leave it out, as diffusers allows)", default=True)
    vae: str = _help(
        "SDXL: an AutoencoderKL (folder or hub id) used instead of the model's own, e.g. an fp16-fixed VAE that "
        "runs in model.dtype ('': the model's VAE, kept float32 where its config asks to upcast)",
        default="",
    )

    def __post_init__(self) -> None:
        _require(self.family in FAMILIES, f"model.family must be one of {', '.join(FAMILIES)}; got {self.family!r}.")
        _require(bool(self.path), "model.path is empty; give a local model directory, a hub id, or 'tiny'.")
        _require(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"model.dtype must be float32, bfloat16 or float16; got {self.dtype!r}.",
        )
        _require(
            self.resolution >= 0 and self.resolution % 16 == 0,
            f"model.resolution must be 0 (the model's default) or a positive multiple of 16; got {self.resolution}.",
        )
        _require(
            self.max_sequence_length >= 0,
            f"model.max_sequence_length must be >= 0 (0: the tokenizer's); got {self.max_sequence_length}.",
        )


# LoRA targets for a UNet's whole blocks: every attention projection, the transformer blocks' input, output and
# feed-forward layers and the ResNet convolutions (the default, attention alone, cannot move what the tiny SD draws
# where: docs/learning.md)
UNET_BLOCKS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2")  # fmt: skip
# LoRA targets for the MMDiTs (FLUX.1, SD3): the image- and text-stream attention projections of every block
FLUX_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass
class LoraConfig:
    rank: int = _help("LoRA rank r", default=4)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha / rank", default=4.0)
    dropout: float = _help("dropout on the LoRA branch", default=0.0)
    target_modules: tuple[str, ...] = _help(
        "module names that get LoRA (SD: attention projections)", default=("to_q", "to_k", "to_v", "to_out.0")
    )

    def __post_init__(self) -> None:
        _require(self.rank >= 1, f"lora.rank must be a positive integer; got {self.rank}.")
        _require(self.alpha > 0, f"lora.alpha must be > 0; got {self.alpha}.")
        _require(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1); got {self.dropout}.")
        _require(len(self.target_modules) > 0, "lora.target_modules is empty; name at least one module.")


@dataclass
class SampleConfig:
    num_steps: int = _help("denoising steps per trajectory", default=20)
    guidance_scale: float = _help("classifier-free guidance scale (1 disables CFG)", default=4.0)
    eta: float = _help("sampler stochasticity: 0 = ODE (DDIM), 1 = DDPM posterior; any value >= 0", default=1.0)
    noise_schedule: str = _help(
        "'gddim' (default, every eta valid), 'ddim' (classic DDIM eta, SD only), 'flow_grpo' (FLUX only)",
        default="gddim",
    )
    sde_window: tuple[int, int] | None = _help(
        "[start, end) step indices that are stochastic and trained; the others are ODE steps (None: all)",
        default=None,
    )
    window_stride: int = _help(
        "steps the SDE window moves later every window_shift_every epochs (0: fixed; MixGRPO's progressive window)",
        default=0,
    )
    window_shift_every: int = _help("epochs the SDE window stays at each position", default=1)
    log_prob_reduction: Literal["mean", "sum"] = _help(
        "how a step's log-probability reduces over latent elements", default="mean"
    )
    batch_size: int = _help("images sampled at once, per process", default=16)
    num_batches_per_epoch: int = _help("sampling batches per epoch, per process", default=2)

    def __post_init__(self) -> None:
        _require(self.num_steps >= 1, f"sample.num_steps must be >= 1; got {self.num_steps}.")
        _require(
            math.isfinite(self.eta) and self.eta >= 0,
            f"sample.eta must be a finite number >= 0 (0 is the ODE sampler); got {self.eta}.",
        )
        _require(
            math.isfinite(self.guidance_scale) and self.guidance_scale >= 1,
            f"sample.guidance_scale must be >= 1 (1 disables CFG); got {self.guidance_scale}.",
        )
        _require(
            self.noise_schedule in ("gddim", "ddim", "flow_grpo"),
            f"sample.noise_schedule must be gddim, ddim or flow_grpo; got {self.noise_schedule!r}.",
        )
        _require(
            self.log_prob_reduction in ("mean", "sum"),
            f"sample.log_prob_reduction must be 'mean' or 'sum'; got {self.log_prob_reduction!r}.",
        )
        _require(self.batch_size >= 1, f"sample.batch_size must be >= 1; got {self.batch_size}.")
        _require(
            self.num_batches_per_epoch >= 1,
            f"sample.num_batches_per_epoch must be >= 1; got {self.num_batches_per_epoch}.",
        )
        _require(self.window_stride >= 0, f"sample.window_stride must be >= 0; got {self.window_stride}.")
        _require(
            self.window_shift_every >= 1, f"sample.window_shift_every must be >= 1; got {self.window_shift_every}."
        )
        _require(
            self.window_stride == 0 or self.sde_window is not None,
            "sample.window_stride moves the SDE window: set sample.sde_window (its first position) too.",
        )
        if self.sde_window is not None:
            start, end = self.sde_window
            _require(
                0 <= start < end <= self.num_steps,
                f"sample.sde_window must satisfy 0 <= start < end <= num_steps={self.num_steps}; "
                f"got {list(self.sde_window)}.",
            )


@dataclass
class RewardConfig:
    spec: str = _help(
        "reward: registry name, 'module:function', 'file.py:function', or a weighted mix 'a=1.0,b=0.1'",
        default="shapes",
    )
    kwargs: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "keyword arguments per registry reward, e.g. {'pickscore': {'model_dir': '/models/ps'}}"},
    )
    on_invalid: Literal["raise", "drop"] = _help(
        "a non-finite reward: 'raise' an error, or 'drop' the sample and count it", default="raise"
    )
    overlap: bool | Literal["auto"] = _help(
        "score each sampling batch in a worker thread while the next batch is sampled (same scores either way); "
        "'auto': when sampling runs on a GPU or the reward is a server (on a CPU the two would share its cores)",
        default="auto",
    )

    def __post_init__(self) -> None:
        _require(bool(self.spec), "reward.spec is empty; name a reward (e.g. 'shapes').")
        for name, value in self.kwargs.items():
            _require(
                isinstance(value, dict),
                f"reward.kwargs[{name!r}] must be an object of keyword arguments, e.g. "
                f'{{"{name}": {{"batch_size": 8}}}}; got {value!r}.',
            )
        _require(
            self.on_invalid in ("raise", "drop"),
            f"reward.on_invalid must be 'raise' or 'drop'; got {self.on_invalid!r}.",
        )


@dataclass
class PromptConfig:
    train: str = _help("training prompts: 'tiny:train', 'tiny:heldout', or a text file with one prompt a line",
                       default="tiny:train")  # fmt: skip
    eval: str = _help("held-out evaluation prompts (same forms)", default="tiny:heldout")

    def __post_init__(self) -> None:
        _require(bool(self.train), "prompts.train is empty; give 'tiny:train' or a prompt file.")


@dataclass
class TrainConfig:
    algorithm: Literal["ddpo_sf", "ddpo_is", "grpo", "nft", "draft"] = _help(
        "'ddpo_sf' (score function), 'ddpo_is' (importance sampling, PPO clip), 'grpo', 'nft' (DiffusionNFT: "
        "the forward process, any sampler) or 'draft' (DRaFT-K: a differentiable reward's gradient "
        "through the last sampling steps)",
        default="grpo",
    )
    epochs: int = _help("epochs; each samples a fresh batch of trajectories and trains on it", default=10)
    lr: float = _help("AdamW learning rate", default=3e-4)
    lr_warmup_steps: int = _help("optimizer steps of linear learning-rate warm-up", default=0)
    lr_schedule: Literal["constant", "cosine"] = _help(
        "after warm-up: 'constant', or 'cosine' decay to 0 at the last epoch", default="constant"
    )
    adam_betas: tuple[float, float] = _help("AdamW betas", default=(0.9, 0.999))
    weight_decay: float = _help("AdamW weight decay", default=1e-4)
    adam_eps: float = _help("AdamW epsilon", default=1e-8)
    max_grad_norm: float = _help("gradient clipping norm", default=1.0)
    batch_size: int = _help("trajectories per gradient micro-batch, per process", default=8)
    gradient_accumulation_steps: int = _help("micro-batches accumulated per optimizer step", default=1)
    num_inner_epochs: int = _help("passes over each epoch's samples", default=1)
    clip_range: float = _help(
        "PPO clip range for the importance ratio. Its scale follows sample.log_prob_reduction: a mean over the "
        "latent's D elements moves the ratio about 1/D as far as a sum does (DDPO's 1e-4 is for 'mean'; PPO's usual "
        "0.2 is for a whole action's probability, a sum); train/clip_fraction shows whether it binds",
        default=1e-4,
    )
    adv_clip_max: float = _help("advantages are clipped to [-adv_clip_max, adv_clip_max]", default=5.0)
    timestep_fraction: float = _help("fraction of the stochastic steps trained per trajectory", default=1.0)
    group_size: int = _help("GRPO: images per prompt (K)", default=4)
    same_noise_in_group: bool = _help("GRPO: the K images of a prompt start from the same noise", default=False)
    antithetic_noise: bool = _help(
        "GRPO: the K images of a prompt come in pairs that start from the same noise and take opposite step noise "
        "(z and -z): a pair's advantages then differ only by what the trained steps' noise did, so whatever the "
        "initial noise decided cancels out of the gradient (needs an even train.group_size)",
        default=False,
    )
    advantage_scale: Literal["group", "batch", "none"] = _help(
        "GRPO: what divides r - group mean: 'group' its group's std, 'batch' the epoch's global reward std "
        "(steadier for small groups), 'none' nothing (Dr. GRPO)",
        default="group",
    )
    kl_coef: float = _help("weight of the KL to the reference (LoRA disabled) policy", default=0.0)
    nft_beta: float = _help(
        "DiffusionNFT: how far the implicit positive and negative policies step from the sampling policy", default=1.0
    )
    nft_decay_rate: float = _help(
        "DiffusionNFT: the sampling policy follows the trained one as an EMA whose decay grows by this per "
        "optimizer step (0: the sampling policy is the trained one at each epoch's start)",
        default=0.001,
    )
    nft_decay_max: float = _help("DiffusionNFT: the largest decay of the sampling policy's EMA", default=0.5)
    draft_k: int = _help(
        "DRaFT: the last sampling steps the reward's gradient flows through (1: ReFL-like)", default=1
    )
    draft_random_k: bool = _help(
        "DRaFT: draw K uniformly from 1..draft_k for each batch (AlignProp's randomised truncation)", default=False
    )
    draft_lv_samples: int = _help(
        "DRaFT-LV: noise the finished sample this many times to the last step's timestep and average the reward's "
        "gradient through that one step over the copies (needs draft_k 1; 0: plain DRaFT-K)",
        default=0,
    )
    nft_guidance_free: bool = _help(
        "DiffusionNFT: train the conditional prediction alone (guidance-free) instead of the guided one", default=False
    )
    stat_buffer_size: int = _help("DDPO: rewards kept per prompt for normalisation, across epochs", default=32)
    stat_min_count: int = _help("DDPO: below this many rewards a prompt uses the batch statistics", default=16)
    mixed_precision: Literal["no", "bf16", "fp16"] = _help("accelerate mixed precision", default="no")
    check_on_policy: bool = _help(
        "before each epoch's first update, re-score every trained step and log the largest |ratio - 1| "
        "(one extra forward pass per trained step; a debugging check)",
        default=False,
    )
    on_nonfinite: Literal["raise", "skip"] = _help(
        "a NaN/inf log-probability, loss or gradient: 'raise' an error naming the epoch and step (nothing is saved "
        "from that epoch), or 'skip' the sample or optimizer step and count it (train/skipped_steps)",
        default="raise",
    )
    seed: int = _help("seed of prompts, noise and initialisation", default=0)

    def __post_init__(self) -> None:
        _require(
            self.algorithm in ("ddpo_sf", "ddpo_is", "grpo", "nft", "draft"),
            f"train.algorithm must be ddpo_sf, ddpo_is, grpo, nft or draft; got {self.algorithm!r}.",
        )
        _require(self.draft_k >= 1, f"train.draft_k must be >= 1; got {self.draft_k}.")
        _require(self.draft_lv_samples >= 0, f"train.draft_lv_samples must be >= 0; got {self.draft_lv_samples}.")
        _require(
            self.draft_lv_samples == 0 or (self.draft_k == 1 and not self.draft_random_k),
            "train.draft_lv_samples (DRaFT-LV) trains through the last step only: set train.draft_k 1 and "
            "train.draft_random_k false, or draft_lv_samples 0.",
        )
        _require(
            math.isfinite(self.nft_beta) and self.nft_beta > 0, f"train.nft_beta must be > 0; got {self.nft_beta}."
        )
        _require(
            0 <= self.nft_decay_max < 1 and self.nft_decay_rate >= 0,
            f"train.nft_decay_max must be in [0, 1) and train.nft_decay_rate >= 0; got {self.nft_decay_max} and "
            f"{self.nft_decay_rate}.",
        )
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "num_inner_epochs", "group_size"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1; got {getattr(self, name)}.")
        _require(self.lr > 0 and math.isfinite(self.lr), f"train.lr must be a positive number; got {self.lr}.")
        _require(
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0,
            f"train.max_grad_norm must be a positive finite number (the gradient is scaled down to this norm; a "
            f"negative one reverses every update, 0 stops learning); got {self.max_grad_norm}.",
        )
        _require(
            math.isfinite(self.adam_eps) and self.adam_eps > 0,
            f"train.adam_eps must be > 0 (AdamW divides by sqrt(v) + eps; 0 gives NaN weights where a gradient is "
            f"0); got {self.adam_eps}. 1e-8 is the usual value.",
        )
        _require(
            all(math.isfinite(b) and 0 <= b < 1 for b in self.adam_betas),
            f"train.adam_betas must be two numbers in [0, 1), e.g. 0.9,0.999; got {list(self.adam_betas)}.",
        )
        _require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"train.weight_decay must be >= 0; got {self.weight_decay}.",
        )
        _require(self.seed >= 0, f"train.seed must be >= 0; got {self.seed}.")
        _require(self.clip_range > 0, f"train.clip_range must be > 0; got {self.clip_range}.")
        _require(self.adv_clip_max > 0, f"train.adv_clip_max must be > 0; got {self.adv_clip_max}.")
        _require(
            0 < self.timestep_fraction <= 1,
            f"train.timestep_fraction must be in (0, 1]; got {self.timestep_fraction}.",
        )
        _require(self.kl_coef >= 0, f"train.kl_coef must be >= 0; got {self.kl_coef}.")
        _require(
            self.mixed_precision in ("no", "bf16", "fp16"),
            f"train.mixed_precision must be no, bf16 or fp16; got {self.mixed_precision!r}.",
        )
        _require(self.lr_warmup_steps >= 0, f"train.lr_warmup_steps must be >= 0; got {self.lr_warmup_steps}.")
        _require(
            self.lr_schedule in ("constant", "cosine"),
            f"train.lr_schedule must be 'constant' or 'cosine'; got {self.lr_schedule!r}.",
        )
        _require(
            self.advantage_scale in ("group", "batch", "none"),
            f"train.advantage_scale must be 'group', 'batch' or 'none'; got {self.advantage_scale!r}.",
        )
        _require(self.stat_buffer_size >= 1, f"train.stat_buffer_size must be >= 1; got {self.stat_buffer_size}.")
        _require(
            self.on_nonfinite in ("raise", "skip"),
            f"train.on_nonfinite must be 'raise' or 'skip'; got {self.on_nonfinite!r}.",
        )


@dataclass
class EvalConfig:
    every_epochs: int = _help("evaluate every this many epochs (0: never during training)", default=5)
    num_prompts: int = _help(
        "held-out prompts evaluated (N spread evenly over the eval prompt list; 0: all)", default=32
    )
    num_steps: int = _help("denoising steps in evaluation", default=20)
    sde_etas: tuple[float, ...] = _help(
        "every-step SDE etas evaluated beside the ODE and the training sampler (metrics labelled sde_eta=<x>)",
        default=(),
    )
    seed: int = _help("seed of the per-prompt evaluation noise", default=1234)
    grid_prompts: int = _help("held-out prompts shown in the image grid saved at each evaluation (0: none)", default=8)
    best_metric: str = _help(
        "an evaluation metric, higher is better, to keep the best LoRA by: '<reward>/<sampler>/mean', e.g. "
        "'shapes/ode/mean' (a held-out verifier's ODE reward while training on a proxy); each new best is saved in "
        "<output_dir>/best ('': off)",
        default="",
    )
    patience: int = _help(
        "with best_metric: stop the run after this many evaluations without a new best (0: train every epoch)",
        default=0,
    )

    def __post_init__(self) -> None:
        _require(self.grid_prompts >= 0, f"eval.grid_prompts must be >= 0; got {self.grid_prompts}.")
        _require(self.patience >= 0, f"eval.patience must be >= 0; got {self.patience}.")
        _require(
            self.patience == 0 or bool(self.best_metric),
            "eval.patience stops a run that has not beaten its best eval.best_metric; name the metric (e.g. "
            "--eval.best_metric shapes/ode/mean) or set eval.patience 0.",
        )
        _require(
            not self.best_metric or self.every_epochs > 0,
            "eval.best_metric needs evaluations during training; set eval.every_epochs > 0 or eval.best_metric ''.",
        )
        _require(self.every_epochs >= 0, f"eval.every_epochs must be >= 0; got {self.every_epochs}.")
        _require(self.num_prompts >= 0, f"eval.num_prompts must be >= 0; got {self.num_prompts}.")
        _require(self.num_steps >= 1, f"eval.num_steps must be >= 1; got {self.num_steps}.")
        _require(
            all(math.isfinite(e) and e > 0 for e in self.sde_etas),
            f"eval.sde_etas must be finite numbers > 0 (the ODE is always evaluated); got {list(self.sde_etas)}.",
        )


@dataclass
class LoggingConfig:
    output_dir: str = _help("directory of the run (config, metrics, checkpoints)", default="runs/diffrl")
    tracker: Literal["none", "tensorboard", "wandb"] = _help("metrics tracker beside the console", default="none")
    run_name: str | None = _help("the run's name in the tracker (None: the run folder's name)", default=None)
    wandb_project: str = _help("W&B project (tracker wandb); W&B's files go into the run folder", default="diffrl")
    wandb_entity: str | None = _help("W&B entity, a user or team (None: W&B's default)", default=None)
    checkpoint_every: int = _help("save a checkpoint every this many epochs (0: only at the end)", default=5)
    keep_last: int = _help("checkpoints kept; older ones are deleted", default=2)
    progress_bars: bool = _help("show progress bars", default=True)

    def __post_init__(self) -> None:
        _require(bool(self.output_dir), "logging.output_dir is empty; give a directory.")
        _require(
            self.tracker in ("none", "tensorboard", "wandb"),
            f"logging.tracker must be none, tensorboard or wandb; got {self.tracker!r}.",
        )
        _require(self.checkpoint_every >= 0, f"logging.checkpoint_every must be >= 0; got {self.checkpoint_every}.")
        _require(self.keep_last >= 1, f"logging.keep_last must be >= 1; got {self.keep_last}.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks that span sections (each section checks its own fields when it is built)."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            section.__post_init__()
        sample, train = self.sample, self.train
        if train.algorithm in ("grpo", "nft"):
            _require(
                train.group_size >= 2,
                f"train.group_size must be >= 2 for {ALGORITHM_NAMES[train.algorithm]}: advantages are rewards "
                f"relative to their group, so a group of {train.group_size} image has none to learn from; got "
                f"{train.group_size}.",
            )
            _require(
                sample.batch_size % train.group_size == 0,
                f"sample.batch_size ({sample.batch_size}) must be a multiple of train.group_size ({train.group_size}) "
                "so that every group of K images is sampled by one process in one batch.",
            )
            _require(
                not train.antithetic_noise or train.group_size % 2 == 0,
                f"train.antithetic_noise samples a group in opposite pairs: train.group_size must be even; got "
                f"{train.group_size}.",
            )
        else:
            _require(
                not (train.antithetic_noise or train.same_noise_in_group),
                f"train.antithetic_noise and train.same_noise_in_group shape GRPO's groups; "
                f"{ALGORITHM_NAMES[train.algorithm]} has none: leave them false.",
            )
        samples_per_epoch = sample.batch_size * sample.num_batches_per_epoch
        step_samples = train.batch_size * train.gradient_accumulation_steps
        _require(
            samples_per_epoch % train.batch_size == 0,
            f"samples per epoch per process (sample.batch_size x sample.num_batches_per_epoch = {samples_per_epoch}) "
            f"must be a multiple of train.batch_size ({train.batch_size}).",
        )
        _require(
            samples_per_epoch % step_samples == 0,
            f"samples per epoch per process ({samples_per_epoch}) must be a multiple of train.batch_size x "
            f"train.gradient_accumulation_steps ({step_samples}) so that no optimizer step is left half-accumulated.",
        )
        if self.model.family in VP_FAMILIES:
            _require(
                sample.noise_schedule in ("gddim", "ddim"),
                f"sample.noise_schedule {sample.noise_schedule!r} is for flow models; use gddim or ddim with SD.",
            )
        else:
            _require(
                sample.noise_schedule in ("gddim", "flow_grpo"),
                f"sample.noise_schedule {sample.noise_schedule!r} is for SD; use gddim or flow_grpo with flow models "
                "(FLUX, SD3).",
            )
        if train.algorithm == "ddpo_sf":
            _require(
                train.num_inner_epochs == 1,
                "train.algorithm='ddpo_sf' is on-policy: set train.num_inner_epochs=1, or use 'ddpo_is'.",
            )
        if train.algorithm == "draft":
            _require(
                train.draft_k <= sample.num_steps,
                f"train.draft_k ({train.draft_k}) must be <= sample.num_steps ({sample.num_steps}).",
            )
        if train.algorithm in ("nft", "draft"):
            return  # trained on the samples of any sampler: every eta, the ODE included
        if sample.eta == 0:
            raise ConfigError(
                "sample.eta=0 samples deterministically (the ODE), so trajectories have no log-probability to train "
                "on; set sample.eta > 0 (1.0 is the DDPM posterior) and evaluate at eta=0 instead."
            )
        _require(
            sample.eta >= MIN_TRAINING_ETA,
            f"sample.eta={sample.eta:g} is too small to train on: a step's std is about eta times the latent's scale, "
            f"and below {MIN_TRAINING_ETA:g} the float32 rounding of the stored latents, not the policy, decides "
            f"its log-probability (or the std underflows to 0); use sample.eta >= {MIN_TRAINING_ETA:g}.",
        )

    # ------------------------------------------------------------------------------------------------------------
    # serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        data = _migrate(data)
        sections = {}
        for f in dataclasses.fields(cls):
            section_type = typing.get_type_hints(cls)[f.name]
            values = data.get(f.name, {})
            _check_keys(section_type, values, prefix=f.name)
            hints = typing.get_type_hints(section_type)
            sections[f.name] = section_type(**{k: _coerce(v, hints[k], f"{f.name}.{k}") for k, v in values.items()})
        _check_keys(cls, data, prefix="")
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """A config file: JSON (``.json``, what every run saves) or YAML (``.yaml`` / ``.yml``), nested by section
        like ``config.json``; unknown keys and wrong types are errors, as on the command line."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as error:
                raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ConfigError(f"config file {str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections; got {type(data).__name__}.")
        return cls.from_dict(data)


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier diffrl, in today's keys: ``eval.etas`` (the etas evaluated, the ODE among them)
    is ``eval.sde_etas`` (every-step SDE etas beside the ODE and the training sampler)."""
    section = data.get("eval") if isinstance(data, dict) else None
    if isinstance(section, dict) and "etas" in section and "sde_etas" not in section:
        section = dict(section)
        etas = section.pop("etas")
        if isinstance(etas, list | tuple):
            section["sde_etas"] = [e for e in etas if isinstance(e, int | float) and e != 0]
        data = {**data, "eval": section}
    return data


def _check_keys(cls: type, values: dict[str, Any], prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix!r} must be a mapping; got {type(values).__name__}.")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            name = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {name!r}{hint} Known keys here: {', '.join(known)}.")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check (and, from strings, parse) a value against a field's type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() == "none")
        if is_none and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, name)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{name} cannot be {value!r}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, args))}; got {value!r}.")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list; got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{name} must have {len(args)} values; got {list(value)}.")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"{name} must be a JSON object; got {value!r}.") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping; got {value!r}.")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false; got {value!r}.")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer; got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer; got {value!r}.")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number; got {value!r}.")
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string; got {value!r}.")
        return value
    if annotation is Any:
        return value
    raise ConfigError(f"{name}: unsupported config type {annotation!r}.")


ALIASES = {"reward": "reward.spec"}
"""Short forms accepted on the command line: ``--reward pickscore=1.0,jpeg_compressibility=0.1``."""


def apply_overrides(config: Config, args: list[str]) -> Config:
    """A new config with ``--section.key value`` / ``--section.key=value`` overrides applied and validated
    (``--reward X`` is short for ``--reward.spec X``)."""
    data = config.to_dict()
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected an override like --sample.eta 1.2; got {arg!r}.")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value.")
            value = args[i + 1]
            i += 1
        i += 1
        key = ALIASES.get(key, key)
        section, dot, name = key.partition(".")
        if not dot:
            raise ConfigError(f"override --{key} must name a section and a key, like --sample.eta.")
        _check_keys(Config, {section: None}, prefix="")
        section_type = typing.get_type_hints(Config)[section]
        _check_keys(section_type, {name: None}, prefix=section)
        data[section][name] = _coerce(value, typing.get_type_hints(section_type)[name], key)
    return Config.from_dict(data)


def describe(config: Config | None = None) -> str:
    """Every key with its default and help text (for ``--help``); with ``config``, its value there, and the
    library default beside every value that differs from it."""
    lines = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        section_type = typing.get_type_hints(Config)[section.name]
        for f in dataclasses.fields(section_type):
            default = getattr(getattr(defaults, section.name), f.name)
            help_text = f.metadata.get("help", "")
            if config is None:
                lines.append(f"  --{section.name}.{f.name} (default {default!r}): {help_text}")
                continue
            value = getattr(getattr(config, section.name), f.name)
            changed = "" if value == default else f"; library default {default!r}"
            lines.append(f"  --{section.name}.{f.name} {value!r}{changed}: {help_text}")
    return "\n".join(lines)
