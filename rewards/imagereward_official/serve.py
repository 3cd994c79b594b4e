"""Serve the official ``image-reward`` package over HTTP, from its own environment (see requirements.txt).

    .venv-imagereward/bin/python rewards/imagereward_official/serve.py --port 8100 [--device cuda]
    diffrl train recipes/ddpo_sd15.py --reward http://127.0.0.1:8100

``--model`` is a release name (``ImageReward-v1.0``, downloaded to ``--download-root``) or a local ``.pt``; with a
local checkpoint put ``med_config.json`` in ``--download-root``. ``--bert-dir`` loads BLIP's BERT tokenizer from a
local folder instead of downloading ``bert-base-uncased``.
"""

import argparse

import numpy as np
import torch
from PIL import Image

from diffrl.rewards.combine import to_uint8
from diffrl.rewards.server import RewardServer, run_forever


def use_local_bert(bert_dir: str) -> None:
    """Make BLIP build its tokenizer from ``bert_dir`` (the package's own init_tokenizer, minus the download)."""
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from transformers import BertTokenizer

    def init_tokenizer():
        tokenizer = BertTokenizer.from_pretrained(bert_dir)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    blip_pretrain.init_tokenizer = init_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ImageReward-v1.0")
    parser.add_argument("--download-root", default=None)
    parser.add_argument("--bert-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    if args.bert_dir:
        use_local_bert(args.bert_dir)
    import ImageReward as RM

    model = RM.load(args.model, device=args.device, download_root=args.download_root)

    def imagereward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        with torch.no_grad():
            pil = [Image.fromarray(np.ascontiguousarray(a)) for a in to_uint8(images)]
            scores = [model.score(prompt, image) for prompt, image in zip(prompts, pil, strict=True)]
        return torch.tensor(scores, dtype=torch.float32)

    run_forever(RewardServer(imagereward, "imagereward_official", (args.host, args.port)))


if __name__ == "__main__":
    main()
