"""Direct reward fine-tuning (DRaFT, Clark et al. 2024; AlignProp, Prabhudesai et al. 2023): back-propagate a
differentiable reward through the last sampling steps.

Each batch is sampled with the configured sampler (eta 0, the ODE, is DRaFT's); the first ``T - K`` steps run
without gradients and the last ``K`` (``train.draft_k``; K = 1 is ReFL-like) with them, every step recomputed in
the backward pass (gradient checkpointing through the sampler), then the images are decoded with gradients and the
reward's gradient flows through the VAE decode, the K steps and the LoRA. The loss is the negative mean reward
(plus ``train.kl_coef`` times the squared distance of the trained steps' model outputs to the reference's).
``train.draft_random_k`` draws K uniformly from 1..draft_k for each batch, as AlignProp's randomised truncation.
Each sampling batch (``sample.batch_size``) is one backward pass; ``train.gradient_accumulation_steps`` counts
sampling batches per optimizer step (``train.batch_size`` is not used). ``train.draft_lv_samples`` n > 0 is
DRaFT-LV (K = 1): the finished sample is noised n times to the last step's timestep and the reward's gradient is
averaged over the n one-step denoisings, a lower-variance estimate for the price of n - 1 more steps and decodes.
A reward without gradients (the shapes verifier, JPEG size) is refused at start-up.
"""

from __future__ import annotations

import random

import torch
from torch.utils.checkpoint import checkpoint

from diffrl.config import ConfigError
from diffrl.rewards.combine import RewardError
from diffrl.trainers.base import Trainer
from diffrl.trainers.common import derived_seed

PROMPTS, NOISE = 301, 302  # purposes mixed into derived seeds


class DRaFTTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.check_reward_is_differentiable()

    def check_reward_is_differentiable(self) -> None:
        side = getattr(self.policy, "resolution", 64)
        probe = torch.full((1, 3, side, side), 0.5, device=self.accelerator.device, requires_grad=True)
        try:
            total, _ = self.reward.differentiable(probe, [self.train_prompts[0]], [{}])
        except RewardError as error:
            raise ConfigError(f"train.algorithm='draft': {error}") from None
        if not total.requires_grad:
            raise ConfigError("train.algorithm='draft' needs a reward with gradients to the image.")

    def batch_prompts(self, epoch: int, batch: int) -> tuple[list[str], list[int]]:
        """This process's prompts and seeds of sampling batch ``batch`` (the epoch's list is fixed globally)."""
        cfg = self.config
        total = self.world * cfg.sample.num_batches_per_epoch * cfg.sample.batch_size
        prompts = random.Random(derived_seed(cfg.train.seed, epoch, PROMPTS)).choices(self.train_prompts, k=total)
        indices = [self.global_index(batch, i) for i in range(cfg.sample.batch_size)]
        return [prompts[g] for g in indices], [derived_seed(cfg.train.seed, epoch, NOISE, g) for g in indices]

    def truncation(self, epoch: int, batch: int) -> int:
        cfg = self.config.train
        if not cfg.draft_random_k:
            return cfg.draft_k
        return random.Random(derived_seed(cfg.seed, epoch, batch, 3)).randint(1, cfg.draft_k)

    def images_with_gradients(self, prompts: list[str], seeds: list[int], k: int) -> tuple[torch.Tensor, list]:
        """Sample ``prompts``; the last ``k`` steps and the decode keep gradients. Returns the images and, per
        trained step, ``(model output, latents, timestep, step index)`` for the KL term.

        With ``train.draft_lv_samples`` n > 0 (DRaFT-LV) every step runs without gradients, the finished sample is
        noised n times to the last step's timestep and that step is taken again with gradients from each copy: the
        images are the n copies' ``[n * B, 3, H, W]`` (copy-major), each sample's copies drawn from its own
        generator."""
        cfg = self.config.sample
        policy, steps = self.policy, cfg.num_steps
        copies = self.config.train.draft_lv_samples
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        embeds = policy.encode_prompts(prompts)
        x = policy.initial_latents(generators)
        trained = []
        first_trained = steps if copies else steps - k
        for i in range(steps):
            t = policy.timestep_input(steps, i)
            if i < first_trained:
                with torch.no_grad():
                    out = policy.predict(x, t, embeds, cfg.guidance_scale)
                    x = policy.step(out, steps, i, x, eta=cfg.eta, noise_schedule=cfg.noise_schedule,
                                    generator=generators).prev_sample  # fmt: skip
                continue
            x = self._step_with_gradients(x, i, t, embeds, generators, trained)
        if not copies:
            return policy.decode(x), trained
        last, t = steps - 1, policy.timestep_input(steps, steps - 1)
        finished, outs = x, []
        for _ in range(copies):
            noise = torch.stack([torch.randn(finished.shape[1:], generator=g) for g in generators]).to(x.device)
            noised = policy.noised(finished, steps, last, noise)
            outs.append(self._step_with_gradients(noised, last, t, embeds, generators, trained))
        return policy.decode(torch.cat(outs)), trained

    def _step_with_gradients(self, x, i: int, t, embeds, generators, trained: list) -> torch.Tensor:
        """Step ``i`` from ``x`` with gradients, recomputed in the backward pass; appends to ``trained``."""
        cfg, policy = self.config.sample, self.policy
        noise = None
        if cfg.eta > 0:  # the step's noise is drawn outside the recomputed function, so both passes see it
            noise = torch.randn(x.shape, generator=generators[0]).to(x.device)

        def one_step(latents):
            out = policy.predict(latents, t, embeds, cfg.guidance_scale)
            step = policy.step(out, cfg.num_steps, i, latents, eta=cfg.eta, noise_schedule=cfg.noise_schedule)
            prev = step.prev_sample if noise is None else (step.mean + step.std * noise).to(latents.dtype)
            return prev, out

        prev, out = checkpoint(one_step, x, use_reentrant=False)
        trained.append((out, x, t, i))
        return prev

    def train(self) -> None:
        cfg = self.config
        self.evaluate_base_policy()
        for epoch in self.epochs():
            timer = self.epoch_timer()
            final = epoch == cfg.train.epochs - 1
            metrics = self.train_epoch_direct(epoch)
            metrics["time/training_s"] = timer.lap()
            self.end_epoch(epoch + 1, metrics, final)
        self.finish()

    def train_epoch_direct(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        accumulation = cfg.train.gradient_accumulation_steps
        torch.manual_seed(derived_seed(cfg.train.seed, epoch, self.rank, 2))  # LoRA dropout
        self.policy.denoiser.train()
        lr = self.lr_scheduler.get_last_lr()[0]
        stats: dict[str, list[float]] = {}
        for batch in range(cfg.sample.num_batches_per_epoch):
            prompts, seeds = self.batch_prompts(epoch, batch)
            k = self.truncation(epoch, batch)
            images, trained = self.images_with_gradients(prompts, seeds, k)
            scored = prompts * (len(images) // len(prompts))  # DRaFT-LV: the batch once per noised copy
            metadata = [{"epoch": epoch} for _ in scored]
            total, parts = self.reward.differentiable(images, scored, metadata)
            loss = -total.mean()
            if cfg.train.kl_coef > 0:
                kl = self.reference_distance(trained, prompts)
                loss = loss + cfg.train.kl_coef * kl
                stats.setdefault("kl", []).append(kl.item())
            if not self._finite(loss, "loss", epoch):
                self.optimizer.zero_grad(set_to_none=True)
                continue
            self.accelerator.backward(loss / accumulation)
            stats.setdefault("loss", []).append(loss.item())
            stats.setdefault("reward", []).append(total.detach().mean().item())
            for name, values in parts.items():
                stats.setdefault(f"reward_{name}", []).append(values.detach().mean().item())
            stats.setdefault("truncation", []).append(float(k))
            if (batch + 1) % accumulation == 0:
                grad_norm = self.accelerator.clip_grad_norm_(self.params, cfg.train.max_grad_norm)
                if self._finite(grad_norm, "gradient norm", epoch):
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.global_step += 1
                    stats.setdefault("grad_norm", []).append(float(grad_norm))
                self.optimizer.zero_grad(set_to_none=True)
        result = {f"train/{name}": sum(v) / len(v) for name, v in stats.items() if not name.startswith("reward")}
        result["reward/mean"] = sum(stats.get("reward", [float("nan")])) / max(1, len(stats.get("reward", [])))
        for name in self.reward.names:
            values = stats.get(f"reward_{name}", [])
            if values:
                result[f"reward/{name}/mean"] = sum(values) / len(values)
        result["train/optimizer_steps"] = len(stats.get("grad_norm", []))
        result["train/lr"] = lr
        return result

    def reference_distance(self, trained: list, prompts: list[str]) -> torch.Tensor:
        """Mean squared distance of the trained steps' model outputs to the reference (LoRA-disabled) model's."""
        embeds = self.policy.encode_prompts(prompts)
        total = 0.0
        for out, latents, t, _ in trained:
            with torch.no_grad(), self.policy.reference():
                reference = self.policy.predict(latents, t, embeds, self.config.sample.guidance_scale)
            total = total + ((out - reference) ** 2).mean()
        return total / max(1, len(trained))
