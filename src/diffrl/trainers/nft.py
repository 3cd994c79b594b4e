"""DiffusionNFT (Zheng et al., 2025): online RL on the forward process, with any sampler.

Each epoch samples K images per prompt with the *sampling policy* (any eta: the ODE by default in its recipes) and
scores them; a sample's advantage within its group becomes an optimality probability ``r``. Training never looks
at the trajectory: each clean sample ``x0`` is noised afresh by the forward process at a step of the sampling
schedule, and the trained network is pulled, through the implicit positive and negative policies around the
sampling policy's prediction, towards the good samples and away from the bad ones (:func:`nft_loss`), with an
optional squared distance to the reference (LoRA-disabled) prediction weighted by ``train.kl_coef``. The sampling
policy is an EMA of the trained LoRA whose decay grows with the optimizer steps (``train.nft_decay_rate`` up to
``train.nft_decay_max``); it is checkpointed, so a resumed run continues exactly. With
``train.nft_guidance_free`` the conditional prediction alone is trained, the paper's CFG-free option.

The loss is written in the clean samples the network predicts (:func:`~diffrl.trainers.common.nft_loss`): for a
flow model (FLUX, SD3) that is the paper's loss on velocities; a VP model (SD1.x/2.x, SDXL) trains its noise (or v)
prediction through the same affine relation at each timestep, its forward process ``sqrt(a) x0 + sqrt(1 - a)
noise`` in place of the flow's ``(1 - t) x0 + t noise``.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from diffrl.config import ConfigError
from diffrl.sampling.rollout import select_embeds
from diffrl.trainers.base import Samples
from diffrl.trainers.common import derived_seed, nft_loss, optimality_probability, subsample_timesteps
from diffrl.trainers.grpo import GRPOTrainer

NFT_NOISE = 103  # a purpose mixed into derived seeds: the forward-process noise of the training pass
OLD = "sampling_policy."  # the prefix of the sampling policy's weights in a checkpoint's trainer tensors


class NFTTrainer(GRPOTrainer):
    def __init__(self, *args, **kwargs):
        self._restored_old: list[torch.Tensor] | None = None
        super().__init__(*args, **kwargs)
        restored = self._restored_old
        self.old = restored if restored is not None else [p.detach().clone() for p in self.params]

    # ------------------------------------------------------------------------------------------------------------
    # the sampling policy

    @contextlib.contextmanager
    def sampling_policy(self):
        """The trained LoRA weights replaced by the sampling policy's inside the block."""
        current = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, old in zip(self.params, self.old, strict=True):
                p.copy_(old)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, current, strict=True):
                    p.copy_(value)

    def sample_epoch(self, epoch: int, prompts_and_seeds) -> Samples:
        with self.sampling_policy():
            return super().sample_epoch(epoch, prompts_and_seeds)

    def update_sampling_policy(self) -> float:
        """``old <- decay old + (1 - decay) trained``, the decay growing with the optimizer steps; returns it."""
        cfg = self.config.train
        decay = min(cfg.nft_decay_rate * self.global_step, cfg.nft_decay_max)
        with torch.no_grad():
            for old, p in zip(self.old, self.params, strict=True):
                old.mul_(decay).add_(p.detach(), alpha=1 - decay)
        return decay

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{OLD}{i}": old for i, old in enumerate(self.old)}

    def restore_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        old = [tensors[f"{OLD}{i}"] for i in range(len(tensors)) if f"{OLD}{i}" in tensors]
        if len(old) != len(self.params):
            raise ConfigError(
                "this checkpoint holds no DiffusionNFT sampling policy matching the trained weights; resume it with "
                "the algorithm that wrote it, or start a new run."
            )
        self._restored_old = [o.to(p.device, p.dtype) for o, p in zip(old, self.params, strict=True)]

    # ------------------------------------------------------------------------------------------------------------
    # the training pass

    def prediction(self, latents, timesteps, embeds) -> torch.Tensor:
        """The network's output (a velocity, or a VP model's noise) with the guidance the trained policy uses."""
        guidance = 1.0 if self.config.train.nft_guidance_free else self.config.sample.guidance_scale
        return self.policy.predict(latents, timesteps, embeds, guidance)

    def train_epoch(self, epoch: int, samples: Samples, advantages: torch.Tensor) -> dict[str, float]:
        """Inner epochs of DiffusionNFT updates on this process's clean samples; returns averaged diagnostics."""
        cfg = self.config.train
        trajectory = samples.trajectory
        device = self.accelerator.device
        r_all = optimality_probability(advantages.to(device), cfg.adv_clip_max)
        keep = samples.valid.nonzero().flatten()
        micro = cfg.batch_size
        usable = (len(keep) // (micro * cfg.gradient_accumulation_steps)) * micro * cfg.gradient_accumulation_steps
        generator = torch.Generator().manual_seed(derived_seed(cfg.seed, epoch, self.rank, 1))
        noise_generator = torch.Generator().manual_seed(derived_seed(cfg.seed, epoch, self.rank, NFT_NOISE))
        torch.manual_seed(derived_seed(cfg.seed, epoch, self.rank, 2))  # LoRA dropout
        num_steps = trajectory.num_steps
        every_step = torch.ones(num_steps, dtype=torch.bool)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.policy.denoiser.train()
        stats: dict[str, list[float]] = {}
        skipped = 0
        bar = tqdm(
            total=cfg.num_inner_epochs * (usable // micro), desc="training", leave=False,
            disable=not (self.config.logging.progress_bars and self.is_main),
        )  # fmt: skip
        x0_all = trajectory.latents[:, -1]
        for _ in range(cfg.num_inner_epochs):
            order = keep[torch.randperm(len(keep), generator=generator)][:usable]
            steps = subsample_timesteps(every_step, len(order), cfg.timestep_fraction, generator)
            for m in range(len(order) // micro):
                rows, cols = order[m * micro : (m + 1) * micro], steps[m * micro : (m + 1) * micro]
                bar.update(1)
                x0 = x0_all[rows].to(device)
                embeds = select_embeds(trajectory.prompt_embeds, rows.to(device))
                for k in range(cols.shape[1]):
                    index = cols[:, k]
                    noise = torch.randn(x0.shape, generator=noise_generator).to(device, x0.dtype)
                    x_t = self.policy.noised(x0, num_steps, index, noise)
                    timesteps = self.policy.timestep_input(num_steps, index)
                    with torch.no_grad(), self.sampling_policy():
                        old_output = self.prediction(x_t, timesteps, embeds)
                    sync = (m + 1) % cfg.gradient_accumulation_steps == 0 and k == cols.shape[1] - 1
                    context = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.policy.denoiser)
                    with context:
                        output = self.prediction(x_t, timesteps, embeds)
                        out = nft_loss(
                            self.policy.predicted_clean(output, num_steps, index, x_t),
                            self.policy.predicted_clean(old_output, num_steps, index, x_t),
                            x0.float(),
                            r_all[rows],
                            cfg.nft_beta,
                        )
                        loss = out.loss.mean() * cfg.adv_clip_max  # the paper's scale: r's slope is 1 / (2 clip)
                        if cfg.kl_coef > 0:
                            with torch.no_grad(), self.policy.reference():
                                reference = self.prediction(x_t, timesteps, embeds)
                            kl = ((output - reference) ** 2).mean()
                            loss = loss + cfg.kl_coef * kl
                            stats.setdefault("kl", []).append(kl.item())
                        self.accelerator.backward(loss / (cfg.gradient_accumulation_steps * cols.shape[1]))
                    stats.setdefault("loss", []).append(loss.item())
                    stats.setdefault("nft_positive", []).append(out.positive.mean().item())
                    stats.setdefault("nft_negative", []).append(out.negative.mean().item())
                if (m + 1) % cfg.gradient_accumulation_steps == 0:
                    grad_norm = self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    if not self._finite(grad_norm, "gradient norm", epoch):
                        skipped += 1
                    else:
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.global_step += 1
                        stats.setdefault("grad_norm", []).append(float(grad_norm))
                        stats.setdefault("sampling_policy_decay", []).append(self.update_sampling_policy())
                    self.optimizer.zero_grad(set_to_none=True)
        bar.close()
        result = {f"train/{name}": sum(values) / len(values) for name, values in stats.items()}
        result["train/optimizer_steps"] = len(stats.get("grad_norm", []))
        if cfg.on_nonfinite == "skip":
            result["train/skipped_steps"] = skipped
        result["train/lr"] = lr
        kept = advantages[keep.to(advantages.device)]
        result["train/advantage_abs_mean"] = kept.abs().mean().item() if len(keep) else 0.0
        result["train/optimality_mean"] = r_all[keep.to(device)].mean().item() if len(keep) else 0.5
        return result
