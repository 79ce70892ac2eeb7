"""Input images are resized as upstream BAGEL's ImageTransform does (data/transforms.py), and any photo size works."""
import numpy as np
import pytest
import torch
from PIL import Image

from bagel_model.core.config import BagelConfig
from bagel_model.core.sampling import SamplingParams
from bagel_model.pipeline import BagelPipeline
from bagel_model.engine.prefill import vit_block
from bagel_model.serving.stages import Request
from bagel_model.core.transforms import (UPSTREAM_MAX_PIXELS, VAE_UPSTREAM, VIT_UPSTREAM, ResizeRule, image_from_pil,
                                    vae_resize_rule, vit_resize_rule)


@pytest.mark.parametrize("hw,vae,vit", [
    ((1000, 1500), (688, 1024), (658, 980)),  # a landscape photo: long side to 1024, 683 rounds to 688
    ((1024, 1024), (1024, 1024), (980, 980)),
    ((512, 768), (512, 768), (518, 770)),  # fits the VAE rule: unchanged; 36.6 and 54.9 patches round up
    ((50, 100), (512, 1024), (490, 980)),  # too small: the short side is raised to 512
    ((500, 4000), (128, 1024), (126, 980)),  # extreme aspect: the long-side cap wins over the short-side minimum
    ((1000, 1000), (992, 992), (980, 980)),  # 1000 / 16 = 62.5 rounds half to even (Python's round), to 62
])
def test_upstream_output_sizes(hw, vae, vit):
    assert VAE_UPSTREAM.output_size(*hw) == vae
    assert VIT_UPSTREAM.output_size(*vae) == vit


def test_7b_rules_are_upstreams_and_tiny_rules_fit_its_tables():
    big, tiny = BagelConfig.preset("bagel-7b-mot"), BagelConfig.preset("tiny")
    assert vae_resize_rule(big) == ResizeRule(1024, 512, 16, UPSTREAM_MAX_PIXELS) == VAE_UPSTREAM
    assert vit_resize_rule(big) == ResizeRule(980, 224, 14, UPSTREAM_MAX_PIXELS) == VIT_UPSTREAM
    # tiny: a 16x16 latent grid of 16-pixel tokens, a 4x4 ViT grid of 14-pixel patches
    assert (vae_resize_rule(tiny).max_size, vae_resize_rule(tiny).min_size, vae_resize_rule(tiny).stride) == (256, 128, 16)
    assert (vit_resize_rule(tiny).max_size, vit_resize_rule(tiny).min_size, vit_resize_rule(tiny).stride) == (56, 14, 14)
    assert vae_resize_rule(tiny).output_size(1000, 1500) == (176, 256)
    assert vit_resize_rule(tiny).output_size(176, 256) == (42, 56)


def test_resize_is_pil_bicubic_and_keeps_a_fitting_image():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    rule = ResizeRule(64, 32, 16)
    out = rule(img)
    h, w = rule.output_size(70, 90)
    want = np.array(Image.fromarray(img.numpy()).resize((w, h), Image.BICUBIC))
    assert out.shape == (48, 64, 3) and np.array_equal(out.numpy(), want)
    assert torch.equal(rule(out), out)


def test_transparent_images_are_composited_on_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    img = image_from_pil(Image.fromarray(rgba, "RGBA"))
    assert img.shape == (4, 4, 3) and img.dtype == torch.uint8
    assert img[0, 0].tolist() == [200, 0, 0] and img[3, 3].tolist() == [255, 255, 255]


def test_bad_image_is_named():
    with pytest.raises(ValueError, match="uint8"):
        VAE_UPSTREAM(torch.zeros(8, 8, 3))


def test_vit_packs_patches_at_the_image_aspect_ratio(tiny_model):
    """A 42x56 ViT input is a 3x4 patch grid: 12 tokens, not the 16 of the square 56x56."""
    img = torch.zeros(42, 56, 3, dtype=torch.uint8)
    assert vit_block(tiny_model, img).embeddings.shape[0] == 12
    assert vit_block(tiny_model, torch.zeros(56, 56, 3, dtype=torch.uint8)).embeddings.shape[0] == 16


def _photo(h: int, w: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([(x * 255 // w), (y * 255 // h), ((x + y) % 256)], -1).to(torch.uint8)


def test_a_1500x1000_photo_is_edited_and_described_deterministically(tiny_model, tokenizer):
    """Any photo size is resized like upstream (tiny preset: to 256x176) instead of being rejected; runs repeat bit
    for bit."""
    pipe = BagelPipeline(tiny_model, tokenizer)
    photo = _photo(1000, 1500)
    p = SamplingParams(steps=2, height=176, width=256, cfg_interval=(0.0, 1.0), cfg_img_scale=2.0,
                       cfg_renorm_type="text_channel")
    runs = [pipe.generate(Request("img2img", "make it blue", p, photo))[1] for _ in range(2)]
    assert runs[0].image.shape == (176, 256, 3)
    assert runs[0].image_md5 == runs[1].image_md5 and runs[0].latent_md5 == runs[1].latent_md5
    texts = [pipe.generate(Request("img2text", "what is this", p, photo, max_tokens=3, ignore_eos=True))[0].text_ids
             for _ in range(2)]
    assert len(texts[0]) == 3 and texts[0] == texts[1]
