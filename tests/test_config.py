import pytest

from bagel_model.core.config import BagelConfig, ConfigError


def test_presets_have_bagel_geometry():
    big = BagelConfig.preset("bagel-7b-mot")
    assert (big.hidden_size, big.num_heads, big.num_kv_heads, big.head_dim, big.num_layers) == (3584, 28, 4, 128, 28)
    assert big.llm.intermediate_size == 18944 and big.llm.vocab_size == 152064
    assert big.rope_theta == 1e6 and big.llm.qk_norm and not big.llm.tie_word_embeddings
    assert big.latent_downsample == 16 and big.patch_latent_dim == 64
    assert big.check_image_size(1024, 1024) == (64, 64)


def test_tiny_reaches_uneven_and_replicated_ulysses_degrees():
    tiny = BagelConfig.preset("tiny")
    assert tiny.num_heads // tiny.num_kv_heads > 1  # GQA
    assert tiny.num_heads % 4 != 0 and 4 > tiny.num_kv_heads and 3 > tiny.num_kv_heads


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        BagelConfig.preset("huge")


@pytest.mark.parametrize("field,value,msg", [
    ("num_attention_heads", 5, "not divisible by num_attention_heads"),
    ("num_key_value_heads", 4, "does not divide num_attention_heads"),
])
def test_invalid_head_combinations(field, value, msg):
    cfg = BagelConfig.preset("tiny")
    setattr(cfg.llm, field, value)
    with pytest.raises(ConfigError, match=msg):
        cfg.validate()


def test_vae_channels_must_fit_groupnorm():
    cfg = BagelConfig.preset("tiny")
    cfg.vae.ch = 48
    with pytest.raises(ConfigError, match="multiples of 32"):
        cfg.validate()


@pytest.mark.parametrize("size", [0, 50, 72])
def test_image_size_not_multiple_of_latent_patch(size):
    with pytest.raises(ConfigError, match="multiple of 16"):
        BagelConfig.preset("tiny").check_image_size(size, 64)


def test_image_larger_than_position_table():
    with pytest.raises(ConfigError, match="position table"):
        BagelConfig.preset("tiny").check_image_size(16 * 17, 64)


def test_config_files_round_trip(tmp_path):
    cfg = BagelConfig.preset("tiny")
    cfg.save(str(tmp_path))
    back = BagelConfig.from_pretrained(str(tmp_path))
    assert back.hidden_size == cfg.hidden_size and back.num_kv_heads == cfg.num_kv_heads
    assert back.vae == cfg.vae and back.generation == cfg.generation
    assert back.vit.num_hidden_layers == cfg.vit.num_hidden_layers  # already-reduced ViT is not reduced twice


def test_missing_llm_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="llm_config.json"):
        BagelConfig.from_pretrained(str(tmp_path))
