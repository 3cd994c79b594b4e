"""What the SD and FLUX policies share: model paths, dtypes, and the LoRA surface (add, train, disable, save, load)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import diffusers
import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from diffrl.config import LoraConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pipeline_dtype(name: str) -> dict[str, torch.dtype]:
    """The dtype keyword of a pipeline's ``from_pretrained``: diffusers 0.42 renamed ``torch_dtype`` to ``dtype``
    (and warns on every load under the old name); older releases know only ``torch_dtype``."""
    major_minor = tuple(int(part) for part in diffusers.__version__.split(".")[:2])
    return {"dtype" if major_minor >= (0, 42) else "torch_dtype": DTYPES[name]}


def resolve_model_path(path: str, family: str = "sd") -> str:
    """``"tiny"`` is the embedded model of the family; a local directory must exist; anything else is a hub id."""
    if path == "tiny":
        from diffrl.tiny import tiny_model_path

        return str(tiny_model_path(family))
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists() or path.count("/") != 1
    if looks_local and not local.is_dir():
        raise FileNotFoundError(
            f"model directory {path!r} does not exist; give a diffusers-layout directory, a hub id "
            "('org/name'), or 'tiny' for the embedded model."
        )
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path!r} is not a diffusers pipeline directory (no model_index.json); save the model with "
            "`pipeline.save_pretrained(dir)` or point model.path at the folder that holds model_index.json."
        )
    return str(local) if local.is_dir() else path


class LoraModel:
    """The trained network of a policy (``self.model``: a UNet or a transformer) with LoRA from peft, or fully
    trainable when ``lora`` is None. Subclasses set ``pipeline_class`` and ``component`` (the pipeline's name for
    the network: ``unet`` or ``transformer``) so that adapters save and load in diffusers' LoRA format."""

    pipeline_class: type
    component: str

    def _setup_training(self, model: torch.nn.Module, lora: LoraConfig | None) -> None:
        self.model = model
        self.lora = lora
        # diffusers' ``dtype`` property walks every module: read it once, before the float32 LoRA weights exist
        self.dtype = model.dtype
        if lora is None:
            model.requires_grad_(True)
            return
        model.requires_grad_(False)
        model.add_adapter(
            PeftLoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                init_lora_weights="gaussian",
                target_modules=list(lora.target_modules),
            )
        )
        cast_training_params(model, dtype=torch.float32)

    def _apply_options(self, model: ModelConfig) -> None:
        """The network options of ``model``: gradient checkpointing, channels-last weights (only 4-D weights change,
        so a transformer is unaffected), and ``torch.compile`` of what forward passes call."""
        if model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        if model.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if model.compile:
            self.denoiser = torch.compile(self.denoiser)

    @cached_property
    def negative_embeds(self):
        """The empty prompt's encoding (the unconditional half of classifier-free guidance), batch of one."""
        return self.encode_prompts([""])

    def guided(self, forward, latents: torch.Tensor, t: torch.Tensor, prompt_embeds, guidance_scale: float):
        """Classifier-free guidance for a prompt encoded as a pair (hidden states ``[B, L, D]``, pooled
        ``[B, P]``): ``forward(latents, t, embeds, pooled)`` once on the conditional batch (guidance 1) or once on
        the unconditional and conditional halves together; float32 out."""
        embeds, pooled = prompt_embeds
        if guidance_scale == 1.0:
            return forward(latents.to(self.dtype), t, embeds, pooled).float()
        batch = latents.shape[0]
        negative, negative_pooled = self.negative_embeds
        out = forward(
            torch.cat([latents, latents]).to(self.dtype),
            torch.cat([t, t]),
            torch.cat([negative.expand(batch, -1, -1), embeds]),
            torch.cat([negative_pooled.expand(batch, -1), pooled]),
        )
        uncond, cond = out.float().chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the base model: LoRA disabled inside the block (a full fine-tune has no reference)."""
        if self.lora is None:
            raise ValueError("a full fine-tune keeps no reference model; set train.kl_coef=0 or train LoRA.")
        self.model.disable_adapters()
        try:
            yield
        finally:
            self.model.enable_adapters()

    def save_adapter(self, directory: str | Path) -> None:
        """LoRA weights in diffusers' format (``pytorch_lora_weights.safetensors`` with the adapter config), loadable
        with the plain pipeline's ``load_lora_weights``; a full fine-tune saves the whole network."""
        directory = Path(directory)
        if self.lora is None:
            self.model.save_pretrained(directory / self.component)
            return
        state = get_peft_model_state_dict(self.model)
        if self.component == "unet":  # as diffusers' UNet LoRA scripts save; its transformer loaders read peft's names
            converted = convert_state_dict_to_diffusers(state)
            # diffusers renames attention layers only: a LoRA on convolutions or feed-forward layers keeps peft's
            # names throughout (a file of both is read as one or the other, and loses the rest)
            if not any(".lora_A." in key or ".lora_B." in key for key in converted):
                state = converted
        self.pipeline_class.save_lora_weights(
            save_directory=directory,
            safe_serialization=True,
            **{
                f"{self.component}_lora_layers": state,
                f"{self.component}_lora_adapter_metadata": self.model.peft_config["default"].to_dict(),
            },
        )

    def load_adapter(self, directory: str | Path) -> None:
        """Load weights written by :meth:`save_adapter` into this policy's LoRA (or network). A training checkpoint's
        folder works too: its ``adapter/`` subfolder is loaded."""
        directory = Path(directory)
        if self.lora is None:
            weights, kind = self.component, f"{self.component}/ folder (a full fine-tune's weights)"
        else:
            weights, kind = LORA_WEIGHT_NAME_SAFE, LORA_WEIGHT_NAME_SAFE
        if not (directory / weights).exists() and (directory / "adapter" / weights).exists():
            directory = directory / "adapter"  # a checkpoint folder
        if not (directory / weights).exists():
            raise FileNotFoundError(
                f"no {kind} in {str(directory)!r}; pass the folder save_adapter wrote, or a training checkpoint "
                "(a run's checkpoints/epoch-NNNNNN folder)."
            )
        if self.lora is None:
            loaded = type(self.model).from_pretrained(directory / self.component)
            self.model.load_state_dict(loaded.state_dict())
            return
        out = self.pipeline_class.lora_state_dict(directory)
        state = out[0] if isinstance(out, tuple) else out
        prefix = f"{self.component}."
        own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        converted = convert_unet_state_dict_to_peft(own)
        expected = get_peft_model_state_dict(self.model, adapter_name="default")
        for key, value in converted.items():
            mine = expected.get(key)
            if mine is not None and mine.shape != value.shape:
                raise ValueError(
                    f"LoRA weights in {str(directory)!r} do not fit this policy's LoRA: {key} is "
                    f"{tuple(value.shape)} there and {tuple(mine.shape)} here (another lora.rank or model); set lora "
                    "to the settings the adapter was trained with."
                )
        result = set_peft_model_state_dict(self.model, converted, "default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected or not own:
            raise ValueError(
                f"LoRA weights in {str(directory)!r} do not fit this model ({unexpected[:5] if unexpected else 'no '}"
                f"{self.component} weights); load an adapter trained on this model family and LoRA config."
            )
