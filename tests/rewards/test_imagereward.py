"""ImageReward: a tiny random checkpoint in the official key layout loads onto transformers' BLIP and scores like
BLIP's own forward pass (ViT from BLIP's ``vit.py``, BERT with cross-attention from ``med.py``), written out here."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertTokenizer

from diffrl.rewards import build_reward
from diffrl.rewards.clip import clip_preprocess
from diffrl.rewards.imagereward import REWARD_MEAN, REWARD_STD, split_checkpoint

V_WIDTH, V_LAYERS, V_HEADS, PATCH, IMAGE = 32, 2, 4, 8, 32
T_WIDTH, T_LAYERS, T_HEADS, T_POSITIONS = 24, 2, 3, 40
WORDS = ["a", "red", "blue", "green", "circle", "square", "two", "left", "of", "triangle"]


def official_state(vocab: int) -> dict[str, torch.Tensor]:
    """Random weights under the names ``ImageReward.pt`` uses."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def linear(name, n_out, n_in):
        state[name + ".weight"], state[name + ".bias"] = rand(n_out, n_in), rand(n_out)

    def norm(name, width):
        state[name + ".weight"], state[name + ".bias"] = 1 + rand(width), rand(width)

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    state = {
        v + "cls_token": rand(1, 1, V_WIDTH),
        v + "pos_embed": rand(1, (IMAGE // PATCH) ** 2 + 1, V_WIDTH),
        v + "patch_embed.proj.weight": rand(V_WIDTH, 3, PATCH, PATCH),
        v + "patch_embed.proj.bias": rand(V_WIDTH),
        t + "embeddings.word_embeddings.weight": rand(vocab, T_WIDTH),
        t + "embeddings.position_embeddings.weight": rand(T_POSITIONS, T_WIDTH),
        t + "embeddings.position_ids": torch.arange(T_POSITIONS).unsqueeze(0),
        "blip.vision_proj.weight": rand(8, V_WIDTH),  # contrastive heads: in the checkpoint, unused by the score
        "blip.text_proj.weight": rand(8, T_WIDTH),
    }
    norm(v + "norm", V_WIDTH)
    for i in range(V_LAYERS):
        p = f"{v}blocks.{i}."
        norm(p + "norm1", V_WIDTH), norm(p + "norm2", V_WIDTH)
        linear(p + "attn.qkv", 3 * V_WIDTH, V_WIDTH), linear(p + "attn.proj", V_WIDTH, V_WIDTH)
        linear(p + "mlp.fc1", 4 * V_WIDTH, V_WIDTH), linear(p + "mlp.fc2", V_WIDTH, 4 * V_WIDTH)
    norm(t + "embeddings.LayerNorm", T_WIDTH)
    for i in range(T_LAYERS):
        p = f"{t}encoder.layer.{i}."
        for block, kv_width in (("attention", T_WIDTH), ("crossattention", V_WIDTH)):
            linear(p + f"{block}.self.query", T_WIDTH, T_WIDTH)
            linear(p + f"{block}.self.key", T_WIDTH, kv_width), linear(p + f"{block}.self.value", T_WIDTH, kv_width)
            linear(p + f"{block}.output.dense", T_WIDTH, T_WIDTH), norm(p + f"{block}.output.LayerNorm", T_WIDTH)
        linear(p + "intermediate.dense", 4 * T_WIDTH, T_WIDTH), linear(p + "output.dense", T_WIDTH, 4 * T_WIDTH)
        norm(p + "output.LayerNorm", T_WIDTH)
    head = ((1024, T_WIDTH), (128, 1024), (64, 128), (16, 64), (1, 16))
    for index, (n_out, n_in) in zip((0, 2, 4, 6, 7), head, strict=True):
        linear(f"mlp.layers.{index}", n_out, n_in)
    return state


def attention(state, p, q_in, kv_in, heads, mask=None):
    """Multi-head attention with separate q, k, v projections; ``mask``: additive ``[B, 1, 1, K]``."""

    def project(name, x):
        y = F.linear(x, state[p + name + ".weight"], state[p + name + ".bias"])
        return y.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    q, k, v = project("query", q_in), project("key", kv_in), project("value", kv_in)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + (0 if mask is None else mask)
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def reference_vit(state, pixels):
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, state[v + "patch_embed.proj.weight"], state[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([state[v + "cls_token"].expand(x.shape[0], 1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + state[v + "pos_embed"]
    for i in range(V_LAYERS):
        p = f"{v}blocks.{i}."
        h = F.layer_norm(x, (V_WIDTH,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
        q, k, val = F.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        split = {"query": q, "key": k, "value": val}
        heads = {n: t.view(t.shape[0], t.shape[1], V_HEADS, -1).transpose(1, 2) for n, t in split.items()}
        a = (heads["query"] @ heads["key"].transpose(-1, -2) / math.sqrt(V_WIDTH // V_HEADS)).softmax(-1)
        a = (a @ heads["value"]).transpose(1, 2).flatten(2)
        x = x + F.linear(a, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = F.layer_norm(x, (V_WIDTH,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (V_WIDTH,), state[v + "norm.weight"], state[v + "norm.bias"], eps=1e-6)


def reference_score(state, pixels, input_ids, attention_mask):
    t = "blip.text_encoder."

    def post_ln(name, residual, update):
        return F.layer_norm(residual + update, (T_WIDTH,), state[name + ".weight"], state[name + ".bias"], eps=1e-12)

    image = reference_vit(state, pixels)
    x = state[t + "embeddings.word_embeddings.weight"][input_ids]
    x = x + state[t + "embeddings.position_embeddings.weight"][: input_ids.shape[1]]
    x = F.layer_norm(x, (T_WIDTH,), state[t + "embeddings.LayerNorm.weight"], state[t + "embeddings.LayerNorm.bias"],
                     eps=1e-12)  # fmt: skip
    mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(T_LAYERS):
        p = f"{t}encoder.layer.{i}."
        for block, kv, block_mask in (("attention", None, mask), ("crossattention", image, None)):
            a = attention(state, p + f"{block}.self.", x, x if kv is None else kv, T_HEADS, block_mask)
            a = F.linear(a, state[p + f"{block}.output.dense.weight"], state[p + f"{block}.output.dense.bias"])
            x = post_ln(p + f"{block}.output.LayerNorm", x, a)
        h = F.gelu(F.linear(x, state[p + "intermediate.dense.weight"], state[p + "intermediate.dense.bias"]))
        h = F.linear(h, state[p + "output.dense.weight"], state[p + "output.dense.bias"])
        x = post_ln(p + "output.LayerNorm", x, h)
    r = x[:, 0]
    for index in (0, 2, 4, 6, 7):  # the dropouts between are identities at evaluation
        r = F.linear(r, state[f"mlp.layers.{index}.weight"], state[f"mlp.layers.{index}.bias"])
    return (r.squeeze(1) - REWARD_MEAN) / REWARD_STD


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    (root / "bert").mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    state = official_state(len(vocab) + 2)  # + [DEC] and [ENC], which BLIP adds to BERT's vocabulary
    torch.save(state, root / "ImageReward.pt")
    return root, state


def test_scores_match_blips_forward_pass(files):
    root, state = files
    reward = build_reward(
        "imagereward", checkpoint=str(root / "ImageReward.pt"), tokenizer_dir=str(root / "bert"), batch_size=2,
        vision_heads=V_HEADS, text_heads=T_HEADS,
    )  # fmt: skip
    prompts = ["a red circle", "two blue squares left of a green triangle", "a green square"]
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(3))
    scores = reward(images, prompts, [{}] * 3)

    tokens = BertTokenizer(str(root / "bert" / "vocab.txt"))(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    with torch.no_grad():
        expected = reference_score(state, clip_preprocess(images, IMAGE), tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert scores.std() > 0.01


def test_foreign_checkpoints_and_missing_files_are_clear_errors(files, tmp_path, monkeypatch):
    root, state = files
    with pytest.raises(KeyError, match="'blip.visual_encoder.blocks.0.ls1.gamma' has no BlipVisionModel"):
        split_checkpoint({**state, "blip.visual_encoder.blocks.0.ls1.gamma": torch.zeros(1)})
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        split_checkpoint({"visual.proj": torch.zeros(1)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="reward.kwargs.imagereward.checkpoint"):
        build_reward("imagereward", checkpoint=str(tmp_path / "missing.pt"), tokenizer_dir=str(root / "bert"))


def test_imagereward_is_differentiable_in_the_images(files):
    root, _ = files
    reward = build_reward(
        "imagereward", checkpoint=str(root / "ImageReward.pt"), tokenizer_dir=str(root / "bert"),
        vision_heads=V_HEADS, text_heads=T_HEADS,
    )  # fmt: skip
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    reward(images, ["a red circle", "a blue square"], [{}, {}]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
