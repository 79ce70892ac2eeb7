"""BagelConfig: built from a checkpoint's own files, or from an embedded preset (``tiny``, ``bagel-7b-mot``)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from transformers import Qwen2Config, SiglipVisionConfig

from .sampling import check_model_defaults
from .tokenizer import TINY_VOCAB_SIZE

PRESETS = ("tiny", "bagel-7b-mot")


class ConfigError(ValueError):
    """An invalid combination of model settings."""


@dataclass
class VAEConfig:
    """FLUX autoencoder settings (BAGEL's ``ae.safetensors``)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        """The fields plus ``downsample``, as upstream's ``AutoEncoderParams`` (and a release's ``vae_config``) has."""
        return {**asdict(self), "downsample": self.downsample}

    @staticmethod
    def from_dict(d: dict) -> "VAEConfig":
        """Read a ``vae_config``. ``downsample`` is derived from ``ch_mult`` here (one halving per level but the
        last); a stated one must agree, and unknown keys are an error rather than silently ignored."""
        from dataclasses import fields

        d = dict(d)
        stated = d.pop("downsample", None)
        names = {f.name for f in fields(VAEConfig)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"vae_config has unknown keys {unknown}; known: {sorted(names | {'downsample'})}")
        cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        if stated is not None and stated != cfg.downsample:
            raise ConfigError(f"vae_config downsample {stated} disagrees with ch_mult {list(cfg.ch_mult)} "
                              f"(which halves the resolution {len(cfg.ch_mult) - 1} times: downsample {cfg.downsample})")
        return cfg


@dataclass
class BagelConfig:
    llm: Qwen2Config
    vae: VAEConfig = field(default_factory=VAEConfig)
    vit: SiglipVisionConfig | None = None
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    # this model's sampling defaults, any ``SamplingParams`` field (``sampling.resolve_sampling`` applies them)
    generation: dict = field(default_factory=dict)
    name: str = "custom"

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def num_heads(self) -> int:
        return self.llm.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.llm.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.llm.hidden_size // self.llm.num_attention_heads

    @property
    def num_layers(self) -> int:
        return self.llm.num_hidden_layers

    @property
    def rope_theta(self) -> float:
        # transformers >= 5 keeps it in rope_parameters; older versions as an attribute.
        params = getattr(self.llm, "rope_parameters", None) or {}
        return float(params.get("rope_theta", getattr(self.llm, "rope_theta", 10000.0)))

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: VAE downsample x latent patch (16 for BAGEL)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    def validate(self) -> "BagelConfig":
        c = self.llm
        if c.hidden_size % c.num_attention_heads:
            raise ConfigError(f"hidden_size {c.hidden_size} is not divisible by num_attention_heads {c.num_attention_heads}")
        if c.num_attention_heads % c.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads {c.num_key_value_heads} does not divide num_attention_heads {c.num_attention_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if not 1 < self.rope_theta < float("inf"):  # 0 gives NaN cos/sin tables (0 ** 0 / 0 ** x), i.e. NaN q/k
            raise ConfigError(f"llm_config rope_theta must be a finite number > 1, got {self.rope_theta}")
        if self.hidden_size % 4:
            raise ConfigError(f"hidden_size {self.hidden_size} must be a multiple of 4 for the 2-D sin-cos position table")
        chans = [self.vae.ch * m for m in self.vae.ch_mult]
        if any(ch % 32 for ch in chans):
            raise ConfigError(f"VAE channel counts {chans} must all be multiples of 32 (GroupNorm with 32 groups)")
        if self.latent_patch_size < 1 or self.max_latent_size < 1:
            raise ConfigError("latent_patch_size and max_latent_size must be positive")
        return self

    def check_image_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent grid (rows, cols) for an image size, or a clear error."""
        d = self.latent_downsample
        for name, s in (("height", height), ("width", width)):
            if s <= 0 or s % d:
                raise ConfigError(f"image {name} {s} must be a positive multiple of {d} "
                                  f"(VAE downsample {self.vae.downsample} x latent patch {self.latent_patch_size})")
        h, w = height // d, width // d
        if max(h, w) > self.max_latent_size:
            raise ConfigError(f"image {height}x{width} needs a {h}x{w} latent grid; this model's position table "
                              f"holds at most {self.max_latent_size}x{self.max_latent_size} "
                              f"({self.max_latent_size * d} pixels per side)")
        return h, w

    # ---- files ---------------------------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        llm = self.llm.to_dict()
        with open(os.path.join(directory, "llm_config.json"), "w") as f:
            json.dump(llm, f, indent=2, sort_keys=True)
        if self.vit is not None:
            with open(os.path.join(directory, "vit_config.json"), "w") as f:
                json.dump(self.vit.to_dict(), f, indent=2, sort_keys=True)
        top = {
            "name": self.name, "latent_patch_size": self.latent_patch_size, "max_latent_size": self.max_latent_size,
            "vit_max_num_patch_per_side": self.vit_max_num_patch_per_side, "connector_act": self.connector_act,
            "vae_config": self.vae.to_dict(),
            "generation": {k: list(v) if isinstance(v, tuple) else v for k, v in self.generation.items()},
        }
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(top, f, indent=2, sort_keys=True)

    @staticmethod
    def from_pretrained(directory: str) -> "BagelConfig":
        """Read ``llm_config.json`` (Qwen2Config), ``vit_config.json`` and ``config.json`` of a checkpoint directory.

        As BAGEL does after loading: ``qk_norm=True``, ``tie_word_embeddings=False``, and the ViT's last layer dropped
        (``vit_config.json`` of the release describes the full SigLIP; ours are written already reduced and marked)."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint directory not found: {directory!r}")
        missing = [n for n in ("llm_config.json", "vit_config.json", "config.json")
                   if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise FileNotFoundError(f"{directory!r} is not a BAGEL checkpoint directory: {', '.join(missing)} "
                                    f"{'is' if len(missing) == 1 else 'are'} missing")
        llm = _read_json_config(Qwen2Config, os.path.join(directory, "llm_config.json"))
        llm.qk_norm = True
        llm.tie_word_embeddings = False
        vit = _read_json_config(SiglipVisionConfig, os.path.join(directory, "vit_config.json"))
        if not getattr(vit, "bagel_last_layer_dropped", False):
            vit.num_hidden_layers -= 1
            vit.bagel_last_layer_dropped = True
        vit.vision_use_head = False
        tpath = os.path.join(directory, "config.json")
        top = _read_json_config(None, tpath)
        if not isinstance(top, dict):
            raise ConfigError(f"{tpath} must hold a JSON object, got {type(top).__name__}")
        vae = VAEConfig.from_dict(top.get("vae_config", {}))
        if top.get("interpolate_pos", False):
            raise ConfigError("config.json sets interpolate_pos: ViT/latent position ids by interpolation are not "
                              "implemented (BAGEL-7B-MoT uses extrapolation, interpolate_pos false)")
        try:
            gen = check_model_defaults(top.get("generation", {}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{tpath}: {e}") from None
        return BagelConfig(
            llm=llm, vae=vae, vit=vit,
            latent_patch_size=top.get("latent_patch_size", 2), max_latent_size=top.get("max_latent_size", 64),
            vit_max_num_patch_per_side=top.get("vit_max_num_patch_per_side", 70),
            connector_act=top.get("connector_act", "gelu_pytorch_tanh"),
            generation=gen, name=top.get("name", os.path.basename(os.path.normpath(directory))),
        ).validate()

    @staticmethod
    def preset(name: str) -> "BagelConfig":
        if name == "tiny":
            return _tiny()
        if name == "bagel-7b-mot":
            return _bagel_7b()
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")


def _read_json_config(cls, path: str):
    """``cls.from_json_file(path)`` (or the plain JSON for ``cls=None``); bad JSON is an error naming the file."""
    try:
        if cls is None:
            with open(path) as f:
                return json.load(f)
        return cls.from_json_file(path)
    except (ValueError, OSError, TypeError) as e:  # json.JSONDecodeError is a ValueError; transformers wraps it
        raise ConfigError(f"{path} is not valid JSON for a {cls.__name__ if cls else 'BAGEL'} config: {e}") from None


def _llm(**kw) -> Qwen2Config:
    cfg = Qwen2Config(**kw)
    cfg.qk_norm = True
    cfg.tie_word_embeddings = False
    return cfg


def _tiny() -> BagelConfig:
    # 6 query heads / 2 KV heads (GQA 3): Ulysses degree 4 does not divide the query heads and exceeds the KV heads,
    # degree 3 exceeds the KV heads -- so CPU tests at world sizes <= 4 reach uneven splits and KV replication.
    llm = _llm(vocab_size=TINY_VOCAB_SIZE, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
               num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
               rms_norm_eps=1e-6)
    vit = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=56, patch_size=14, num_channels=3, vision_use_head=False)
    vit.bagel_last_layer_dropped = True
    vae = VAEConfig(resolution=64, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)
    return BagelConfig(llm=llm, vae=vae, vit=vit, max_latent_size=16, vit_max_num_patch_per_side=4,
                       generation={"steps": 10}, name="tiny").validate()


def _bagel_7b() -> BagelConfig:
    llm = _llm(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
               rms_norm_eps=1e-6)
    vit = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                             image_size=980, patch_size=14, num_channels=3, vision_use_head=False)
    vit.bagel_last_layer_dropped = True
    return BagelConfig(llm=llm, vae=VAEConfig(), vit=vit, max_latent_size=64, name="bagel-7b-mot").validate()
