import torch
from diffusers import StableDiffusionPipeline

from diffrl.tiny.build import (
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    grammar_words,
    save_pipeline,
)
from diffrl.tiny.world import all_captions


def test_every_grammar_word_is_one_token_and_other_words_still_encode(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    for word in grammar_words():
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, tokenizer.convert_ids_to_tokens(ids)
    longest = max(len(tokenizer(c.text).input_ids) for c in all_captions())
    assert longest <= tokenizer.model_max_length
    assert tokenizer.unk_token_id not in tokenizer("a red dog").input_ids[1:-1]


def test_random_tiny_pipeline_round_trips_through_plain_diffusers(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    save_pipeline(
        tmp_path / "model",
        vae=build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(),
    )
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert pipeline.unet.dtype == torch.float32
    assert pipeline.text_encoder.dtype == torch.float32
    images = pipeline(
        ["a red circle", "two blue squares"],
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
