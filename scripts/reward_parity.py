"""Parity of diffrl's in-process HPS v2 and ImageReward with the official code, on random weights.

The official code cannot share diffrl's environment (open_clip needs torchvision; ``image-reward`` needs old
transformers and timm), so this runs in two environments and exchanges files (npz and JSON, plus the checkpoints in
their official formats):

    # 1. in an isolated environment with the official packages (scripts/reward_parity_requirements.txt):
    python scripts/reward_parity.py official --out runs/parity
    # 2. in diffrl's environment:
    python scripts/reward_parity.py compare --out runs/parity

Stage 1 builds each model with the official code and random weights (HPS: open_clip's ViT-H-14 with its widths and
heads but 2 layers per tower; ImageReward: the package's ``ImageReward`` class with BLIP ViT-L and a 2-layer
BERT), saves the checkpoint in the official layout, scores smooth random images with the official preprocessing,
tokenizer and forward pass, and writes the preprocessed pixels too. Stage 2 loads the checkpoints through
diffrl's reward factories and reports (a) model parity: diffrl's model on the official pixels; (b) end to end:
diffrl's reward on the uint8 images (tensor preprocessing, transformers tokenizers).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "a photo of a red fox in the snow",
    "two blue squares left of a green triangle",
    "an oil painting of a lighthouse at dusk, dramatic clouds",
    "a bowl of ramen",
]


def smooth_images(count: int, height: int = 256, width: int = 320) -> np.ndarray:
    """uint8 ``[count, H, W, 3]``: random low-frequency colour fields (resampling kernels agree on them)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, 6, 8, generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (fine * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------------------------
# stage 1: the official code


def official_hps(out: Path, images: np.ndarray) -> None:
    import open_clip
    from open_clip.tokenizer import default_bpe
    from PIL import Image

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=1024,
        vision_cfg={"image_size": 224, "layers": 2, "width": 1280, "head_width": 80, "patch_size": 14},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 2},
        output_dict=True,
    ).eval()
    torch.save({"state_dict": model.state_dict()}, out / "HPS_parity.pt")
    preprocess = open_clip.transform.image_transform(224, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images])
    with torch.no_grad():  # hpsv2's img_score.score: diag(image_features @ text_features.T), both normalised
        output = model(pixels, tokenizer(PROMPTS))
        scores = (output["image_features"] * output["text_features"]).sum(dim=-1)
    np.savez(out / "hps.npz", pixels=pixels.numpy(), scores=scores.numpy())
    _write_clip_tokenizer(Path(default_bpe()), out / "hps_clip")


def _write_clip_tokenizer(bpe_path: Path, folder: Path) -> None:
    """open_clip's BPE file -> the vocab.json / merges.txt pair transformers' CLIPTokenizer reads (same ids)."""
    from open_clip.tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(bpe_path) as file:
        merges = file.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def official_imagereward(out: Path, images: np.ndarray) -> None:
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.ImageReward import ImageReward
    from PIL import Image
    from transformers import BertTokenizer

    words = sorted({w for p in PROMPTS for w in p.replace(",", " ,").split()})
    (out / "bert").mkdir(exist_ok=True)
    (out / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *words]))

    def local_tokenizer():  # BLIP's init_tokenizer, from a local vocabulary instead of a download
        tokenizer = BertTokenizer(str(out / "bert" / "vocab.txt"))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    blip_pretrain.init_tokenizer = local_tokenizer
    med_config = {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 1024,
        "add_cross_attention": True,
    }  # fmt: skip
    (out / "med_config.json").write_text(json.dumps(med_config))
    torch.manual_seed(0)
    model = ImageReward(med_config=str(out / "med_config.json"), device="cpu").eval()
    for layer in model.mlp.layers:  # the package's head init is near zero: every image would score the same
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
            torch.nn.init.normal_(layer.bias, std=0.1)
    torch.save(model.state_dict(), out / "ImageReward_parity.pt")
    pil = [Image.fromarray(image) for image in images]
    pixels = torch.stack([model.preprocess(image) for image in pil])
    with torch.no_grad():
        scores = torch.tensor([float(model.score(prompt, image)) for prompt, image in zip(PROMPTS, pil, strict=True)])
    np.savez(out / "imagereward.npz", pixels=pixels.numpy(), scores=scores.numpy())


# ---------------------------------------------------------------------------------------------------------------
# stage 2: diffrl


def _report(name: str, ours: torch.Tensor, theirs: np.ndarray) -> None:
    theirs_t = torch.from_numpy(theirs).float()
    diff = (ours - theirs_t).abs().max().item()
    print(f"  {name}: max |diffrl - official| = {diff:.2e}; official scores {np.round(theirs, 4).tolist()} "
          f"(spread across images {theirs_t.std().item():.2e})")  # fmt: skip


def compare(out: Path, images: np.ndarray) -> None:
    from transformers import BertTokenizer, CLIPConfig

    from diffrl.rewards import build_reward
    from diffrl.rewards.hps import load_hps_model
    from diffrl.rewards.imagereward import ImageRewardScorer, load_imagereward_checkpoint

    tensor_images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 2,
                     "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu"},
        vision_config={"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 2,
                       "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
        projection_dim=1024,
    )  # fmt: skip
    config.save_pretrained(out / "hps_clip")
    from transformers import CLIPTokenizer

    files = (str(out / "hps_clip" / "vocab.json"), str(out / "hps_clip" / "merges.txt"))
    CLIPTokenizer(*files, pad_token="!").save_pretrained(out / "hps_clip")
    official = np.load(out / "hps.npz")
    model = load_hps_model(str(out / "HPS_parity.pt"), str(out / "hps_clip"))
    reward = build_reward("hpsv2", checkpoint=str(out / "HPS_parity.pt"), clip_dir=str(out / "hps_clip"))
    with torch.no_grad():
        pixels = torch.from_numpy(official["pixels"])
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = CLIPTokenizer.from_pretrained(out / "hps_clip")(
            PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        text = model.text_projection(model.text_model(input_ids=tokens.input_ids).pooler_output)
        model_scores = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        end_to_end = reward(tensor_images, PROMPTS, [{}] * len(PROMPTS))
    print("HPS v2 (open_clip ViT-H-14 widths, 2 layers per tower):")
    _report("model on official pixels", model_scores, official["scores"])
    _report("end to end (tensor preprocessing)", end_to_end, official["scores"])

    official = np.load(out / "imagereward.npz")
    scorer = ImageRewardScorer(load_imagereward_checkpoint(str(out / "ImageReward_parity.pt")))
    reward = build_reward(
        "imagereward", checkpoint=str(out / "ImageReward_parity.pt"), tokenizer_dir=str(out / "bert")
    )
    tokenizer = BertTokenizer.from_pretrained(out / "bert")
    with torch.no_grad():
        tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        model_scores = scorer(torch.from_numpy(official["pixels"]), tokens.input_ids, tokens.attention_mask)
        end_to_end = reward(tensor_images, PROMPTS, [{}] * len(PROMPTS))
    print("ImageReward (BLIP ViT-L, 2-layer BERT):")
    _report("model on official pixels", model_scores, official["scores"])
    _report("end to end (tensor preprocessing)", end_to_end, official["scores"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["official", "compare"])
    parser.add_argument("--out", type=Path, default=Path("runs/parity"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    images = smooth_images(len(PROMPTS))
    if args.stage == "official":
        official_hps(args.out, images)
        official_imagereward(args.out, images)
        print(f"official scores and checkpoints written to {args.out}")
    else:
        compare(args.out, images)


if __name__ == "__main__":
    main()
