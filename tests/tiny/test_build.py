import torch
from diffusers import StableDiffusionPipeline
from random_models import save_random_sd

from diffrl.config import LoraConfig, ModelConfig
from diffrl.policies.sd import SDPolicy
from diffrl.sampling.gddim import to_x0_eps
from diffrl.sampling.rollout import rollout
from diffrl.tiny.build import build_scheduler, build_tokenizer, grammar_words
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
    # saved as the shipped model is (UNet and VAE in float16); diffusers loads them as float32
    pipeline = StableDiffusionPipeline.from_pretrained(save_random_sd(tmp_path, dtype=torch.float16))
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


def test_a_zero_terminal_snr_model_starts_from_pure_noise_and_samples_at_every_eta(tmp_path):
    model = save_random_sd(tmp_path, scheduler=build_scheduler(zero_terminal_snr=True))
    policy = SDPolicy.load(ModelConfig(path=str(model)), LoraConfig())
    assert policy.prediction_type == "v_prediction"
    first = policy.schedule(5).timesteps[0]
    assert first == 999 and policy.alphas_cumprod[first] == 0
    # at SNR 0 the clean sample is minus v and the noise is the sample itself: finite, no division by a_t
    v, x = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x0, eps = to_x0_eps(v, x, torch.tensor(0.0), "v_prediction")
    assert torch.equal(x0, -v) and torch.equal(eps, x)
    for eta in (0.0, 1.0, 2.5):
        out = rollout(policy, ["a red circle", "two blue squares"], [1, 2], eta=eta, num_steps=5, guidance_scale=2.0)
        assert torch.isfinite(out.images).all() and torch.isfinite(out.log_probs).all()
        assert (out.log_probs != 0).all() == (eta > 0)
