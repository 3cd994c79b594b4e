"""HPS v2: an open_clip-layout checkpoint (tiny, random) loads onto transformers' CLIPModel and scores like
open_clip's own forward pass, written out here from open_clip's architecture (``open_clip/transformer.py``)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor

from diffrl.rewards import build_reward
from diffrl.rewards.clip import clip_preprocess
from diffrl.rewards.hps import load_hps_model, open_clip_to_transformers
from diffrl.tiny.build import build_tokenizer

WIDTH, LAYERS, HEADS, EMBED, PATCH, IMAGE, CONTEXT = 32, 2, 4, 16, 8, 32, 16


def open_clip_state(vocab: int) -> dict[str, torch.Tensor]:
    """Random weights under open_clip's key names and shapes for a ViT CLIP."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {
        "visual.class_embedding": rand(WIDTH),
        "visual.positional_embedding": rand((IMAGE // PATCH) ** 2 + 1, WIDTH),
        "visual.conv1.weight": rand(WIDTH, 3, PATCH, PATCH),
        "visual.proj": rand(WIDTH, EMBED),
        "token_embedding.weight": rand(vocab, WIDTH),
        "positional_embedding": rand(CONTEXT, WIDTH),
        "text_projection": rand(WIDTH, EMBED),
        "logit_scale": torch.tensor(4.6052),
        "attn_mask": torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1),
    }
    for name in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        state[f"{name}.weight"], state[f"{name}.bias"] = 1 + rand(WIDTH), rand(WIDTH)
    for tower in ("visual.transformer", "transformer"):
        for i in range(LAYERS):
            p = f"{tower}.resblocks.{i}."
            for ln in ("ln_1", "ln_2"):
                state[p + ln + ".weight"], state[p + ln + ".bias"] = 1 + rand(WIDTH), rand(WIDTH)
            state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"] = rand(3 * WIDTH, WIDTH), rand(3 * WIDTH)
            state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"] = rand(WIDTH, WIDTH), rand(WIDTH)
            state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"] = rand(4 * WIDTH, WIDTH), rand(4 * WIDTH)
            state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"] = rand(WIDTH, 4 * WIDTH), rand(WIDTH)
    return state


def reference_blocks(state, tower: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock stack: pre-LN, nn.MultiheadAttention, GELU MLP."""
    for i in range(LAYERS):
        p = f"{tower}.resblocks.{i}."
        attention = torch.nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        attention.load_state_dict(
            {k.removeprefix(p + "attn."): v for k, v in state.items() if k.startswith(p + "attn.")}
        )
        h = F.layer_norm(x, (WIDTH,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attention(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (WIDTH,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    return x


def reference_encode_image(state, pixels: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, WIDTH)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = F.layer_norm(x, (WIDTH,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    x = reference_blocks(state, "visual.transformer", x, None)
    x = F.layer_norm(x[:, 0], (WIDTH,), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
    return F.normalize(x @ state["visual.proj"], dim=-1)


def reference_encode_text(state, tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"]
    x = reference_blocks(state, "transformer", x, state["attn_mask"])
    x = F.layer_norm(x, (WIDTH,), state["ln_final.weight"], state["ln_final.bias"])
    # open_clip pools at tokens.argmax(-1): in CLIP's vocabulary the first EOT token has the largest id
    x = x[torch.arange(x.shape[0]), (tokens == eot_id).int().argmax(dim=-1)]
    return F.normalize(x @ state["text_projection"], dim=-1)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """An HPS-style checkpoint (``{"state_dict": ...}``, as hpsv2 saves it) and a CLIP folder with its config."""
    root = tmp_path_factory.mktemp("hps")
    tokenizer = build_tokenizer(root / "clip")
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "hidden_act": "gelu",
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "max_position_embeddings": CONTEXT,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": LAYERS, "hidden_act": "gelu",
            "num_attention_heads": HEADS, "image_size": IMAGE, "patch_size": PATCH,
        },
        projection_dim=EMBED,
    )  # fmt: skip
    config.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(
        root / "clip"
    )
    state = open_clip_state(len(tokenizer))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "HPS_tiny.pt")
    return root, state


def test_mapping_covers_every_clip_parameter_and_rejects_unknown_keys(hps_files):
    root, state = hps_files
    model = load_hps_model(str(root / "HPS_tiny.pt"), str(root / "clip"))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    with pytest.raises(KeyError, match="'visual.attn_pool.query' has no CLIPModel counterpart"):
        open_clip_to_transformers({**state, "visual.attn_pool.query": torch.zeros(1)})


def test_scores_match_open_clips_forward_pass(hps_files):
    root, state = hps_files
    reward = build_reward("hpsv2", checkpoint=str(root / "HPS_tiny.pt"), clip_dir=str(root / "clip"), batch_size=2)
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    prompts = ["a red circle", "two blue squares left of a green triangle", "a yellow square"]
    scores = reward(images, prompts, [{}] * 3)

    tokenizer = AutoTokenizer.from_pretrained(root / "clip")
    tokens = tokenizer(prompts, padding="max_length", max_length=CONTEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        image_embeds = reference_encode_image(state, clip_preprocess(images, IMAGE))
        text_embeds = reference_encode_text(state, tokens, tokenizer.eos_token_id)
    expected = (image_embeds * text_embeds).sum(dim=-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert scores.std() > 0.01  # the test can tell the images apart


def test_a_missing_checkpoint_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="reward.kwargs.hpsv2.checkpoint"):
        build_reward("hpsv2", checkpoint=str(tmp_path / "missing.pt"), clip_dir=str(tmp_path))


def test_hps_is_differentiable_in_the_images(hps_files):
    root, _ = hps_files
    reward = build_reward("hpsv2", checkpoint=str(root / "HPS_tiny.pt"), clip_dir=str(root / "clip"))
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    reward(images, ["a red circle", "a blue square"], [{}, {}]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
