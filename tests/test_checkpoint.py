"""save_pretrained / from_pretrained round trip and strict key checking, on a synthetic tiny checkpoint."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel_model.core.checkpoint import CheckpointError, from_pretrained, save_pretrained
from bagel_model.core.sampling import SamplingParams
from bagel_model.serving.stages import Request
from bagel_model.pipeline import BagelPipeline


@pytest.fixture()
def ckpt(tmp_path, tiny_model, tokenizer):
    save_pretrained(tiny_model, str(tmp_path), tokenizer)
    return tmp_path


def test_released_layout(ckpt):
    names = set(os.listdir(ckpt))
    assert {"ema.safetensors", "ae.safetensors", "config.json", "llm_config.json", "vit_config.json",
            "model.safetensors.index.json", "tokenizer.json"} <= names
    ema = load_file(str(ckpt / "ema.safetensors"))
    for key in ["language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.0.self_attn.q_proj_moe_gen.bias",
                "language_model.model.layers.1.self_attn.k_norm_moe_gen.weight", "language_model.model.layers.0.mlp_moe_gen.gate_proj.weight",
                "language_model.model.layers.0.input_layernorm_moe_gen.weight", "language_model.model.norm_moe_gen.weight",
                "language_model.lm_head.weight", "time_embedder.mlp.0.weight", "time_embedder.mlp.2.bias", "vae2llm.weight",
                "llm2vae.bias", "latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed", "connector.fc1.weight",
                "language_model.model.embed_tokens.weight"]:
        assert key in ema, key
    assert "language_model.model.layers.0.self_attn.o_proj.bias" not in ema  # o_proj has no bias
    assert any(k.startswith("vit_model.vision_model.") for k in ema)
    assert not any(k.startswith("vae.") for k in ema)
    ae = load_file(str(ckpt / "ae.safetensors"))
    assert all(k.startswith(("encoder.", "decoder.")) for k in ae) and "decoder.conv_out.weight" in ae
    index = json.load(open(ckpt / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(ema)


def test_round_trip_gives_bit_identical_image(ckpt, tiny_model, tokenizer):
    model, tok = from_pretrained(str(ckpt))
    p = SamplingParams(steps=3, height=32, width=32)
    a = BagelPipeline(tiny_model, tokenizer).generate(Request("text2img", "a red cube", p))[1]
    b = BagelPipeline(model, tok).generate(Request("text2img", "a red cube", p))[1]
    assert a.latent_md5 == b.latent_md5 and a.image_md5 == b.image_md5


def _rewrite(path, fn):
    """A checkpoint saved wrong by its producer: the file and its checksum agree, the structural checks object."""
    from bagel_model.core.checksums import write_sha256

    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))
    write_sha256(str(path))


def test_missing_key_is_named(ckpt):
    _rewrite(ckpt / "ema.safetensors", lambda sd: sd.pop("llm2vae.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): llm2vae.weight"):
        from_pretrained(str(ckpt))


def test_unexpected_key_is_named(ckpt):
    _rewrite(ckpt / "ae.safetensors", lambda sd: sd.__setitem__("decoder.extra", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): decoder.extra"):
        from_pretrained(str(ckpt))


def test_misshaped_key_is_named(ckpt):
    _rewrite(ckpt / "ema.safetensors", lambda sd: sd.__setitem__("vae2llm.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"vae2llm.bias: checkpoint \(3,\)"):
        from_pretrained(str(ckpt))


def test_missing_files(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="not found"):
        from_pretrained(str(tmp_path / "nope"))
    os.remove(ckpt / "ae.safetensors")
    with pytest.raises(CheckpointError, match="VAE weights file is missing"):
        from_pretrained(str(ckpt))


def test_a_transposed_patch_embedding_is_refused(ckpt):
    """The release's Linear (E, p*p*C) and the model's Conv2d (E, C, p, p) are accepted; the same element count
    in any other shape (here the Linear transposed) would load scrambled."""
    key = next(k for k in load_file(str(ckpt / "ema.safetensors")) if k.endswith("patch_embedding.weight"))
    _rewrite(ckpt / "ema.safetensors", lambda sd: sd.__setitem__(key, sd[key].t().contiguous()))
    with pytest.raises(CheckpointError, match=f"mis-shaped keys \\(1\\): {key}: checkpoint"):
        from_pretrained(str(ckpt))


def _flip_a_bit(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01  # inside the last tensor's bytes: still a valid, finite safetensors file
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_caught_by_the_written_checksum(ckpt):
    assert (ckpt / "ema.safetensors.sha256").is_file() and (ckpt / "ae.safetensors.sha256").is_file()
    from_pretrained(str(ckpt))  # verified and loaded
    _flip_a_bit(ckpt / "ema.safetensors")
    with pytest.raises(CheckpointError, match=r"ema.safetensors: SHA-256 [0-9a-f]{16}\.\.\. != the recorded"):
        from_pretrained(str(ckpt))


def test_checksums_in_the_index_are_verified(ckpt):
    from bagel_model.core.checksums import file_sha256

    for f in ckpt.glob("*.sha256"):
        f.unlink()
    index = json.load(open(ckpt / "model.safetensors.index.json"))
    index["metadata"]["sha256"] = {"ae.safetensors": file_sha256(str(ckpt / "ae.safetensors"))}
    json.dump(index, open(ckpt / "model.safetensors.index.json", "w"))
    from_pretrained(str(ckpt))
    _flip_a_bit(ckpt / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"ae.safetensors: SHA-256 .* != the recorded"):
        from_pretrained(str(ckpt))
