"""A generation request's sampling parameters and the one place their defaults are resolved.

Defaults come in three layers, applied in this order by ``resolve_sampling`` (and nowhere else):
1. ``SamplingParams``' own field defaults: upstream BAGEL's text-to-image settings (docs/DESIGN.md §1);
2. the model's (``BagelConfig.generation``: a preset or checkpoint may set any field, e.g. ``tiny``'s 10 steps);
3. the mode's (``MODE_DEFAULTS``: image editing has its own CFG settings);
then whatever the caller gives. The pipeline, the CLI (whose ``--help`` prints them from here), the split and the
sweep all build their parameters through it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace

RENORM_TYPES = ("global", "channel", "text_channel")


POLICIES = ("none", "fixed", "dbcache")
CACHE_PRESETS = ("none", "fixed", "dbcache", "taylorseer")  # CacheConfig.named's names


@dataclass(frozen=True)
class CacheConfig:
    """A request's step-cache settings (``engine.cache`` does the caching; docs/DESIGN.md §10). ``front``/``back``:
    layers always computed at the start / end of the stack; the rest is the cached middle."""

    policy: str = "none"
    # The defaults are vllm-omni's for cache-dit on BAGEL (F1B0, warm-up 4, threshold 0.24, at most 3 reused steps
    # in a row); ``fixed`` computes every third step after the warm-up: 20 of a 50-timestep request's 49
    # evaluations (41 %).
    front: int = 1
    back: int = 0
    warmup: int = 4  # the request's first steps, always computed
    tail: int = 1  # fixed: the request's last steps, always computed
    interval: int = 3  # fixed: compute every interval-th step after the warm-up
    threshold: float = 0.24  # dbcache: reuse while the relative L1 change of the front residual is below this
    max_cached_run: int = 3  # dbcache: at most this many reused steps in a row
    taylor_order: int = 0  # 0: reuse the residual as it was; 1 or 2: TaylorSeer extrapolation

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    def validate(self, steps: int | None = None, num_layers: int | None = None) -> "CacheConfig":
        """Every knob checked, with the request's step count and the model's layer count where given."""
        if self.policy not in POLICIES:
            raise ValueError(f"unknown cache policy {self.policy!r}; expected one of {POLICIES}")
        for name in ("front", "back", "warmup", "tail", "max_cached_run", "taylor_order"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"cache {name} must be an integer >= 0, got {v!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, numbers.Integral) or self.interval < 1:
            raise ValueError(f"cache interval must be an integer >= 1, got {self.interval!r}")
        if self.taylor_order > 2:
            raise ValueError(f"cache taylor_order must be 0, 1 or 2, got {self.taylor_order}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"cache threshold must be a finite number >= 0, got {t!r}")
        if self.enabled and num_layers is not None and self.front + self.back >= num_layers:
            raise ValueError(f"cache front {self.front} + back {self.back} leave no middle layer of the model's "
                             f"{num_layers}: their sum must be < {num_layers}")
        if self.enabled and self.front < 1:
            raise ValueError("cache front must be >= 1: the middle layers' input must differ from the embeddings "
                             "for dbcache's statistic, and fixed keeps the same split")
        if self.enabled and steps is not None:
            updates = steps - 1  # a request of N timesteps runs the model N-1 times
            if self.warmup + (self.tail if self.policy == "fixed" else 0) > updates:
                raise ValueError(f"cache warmup {self.warmup}" + (f" + tail {self.tail}" if self.policy == "fixed"
                                                                   else "")
                                 + f" exceed the request's {updates} model evaluations ({steps} timesteps)")
        return self

    @staticmethod
    def named(name: str) -> "CacheConfig":
        """The presets ``bagel-generate --cache`` offers: none, fixed, dbcache, taylorseer (fixed + order 1)."""
        presets = {"none": CacheConfig(), "fixed": CacheConfig(policy="fixed"),
                   "dbcache": CacheConfig(policy="dbcache"),
                   "taylorseer": CacheConfig(policy="fixed", taylor_order=1)}
        if name not in presets:
            raise ValueError(f"unknown cache {name!r}; expected one of {CACHE_PRESETS} or a CacheConfig")
        return presets[name]

    @staticmethod
    def of(value: "CacheConfig | str | None") -> "CacheConfig":
        if value is None:
            return CacheConfig()
        if isinstance(value, str):
            return CacheConfig.named(value)
        if not isinstance(value, CacheConfig):
            raise TypeError(f"cache must be a CacheConfig or a preset name, got {value!r}")
        return value


@dataclass
class SamplingParams:
    """Every request parameter of a generation; all of them travel between pipeline stages."""

    steps: int = 50
    seed: int = 0
    height: int = 1024
    width: int = 1024
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.5
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_min: float = 0.0
    cfg_renorm_type: str = "global"
    cache: CacheConfig = field(default_factory=CacheConfig)  # step caching (off by default: every md5 as without)

    def validate(self) -> "SamplingParams":
        for name in ("timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not (isinstance(self.cfg_interval, (tuple, list)) and len(self.cfg_interval) == 2
                and all(isinstance(v, numbers.Real) and math.isfinite(v) for v in self.cfg_interval)):
            raise ValueError(f"cfg_interval must be two finite numbers (lo, hi), got {self.cfg_interval!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.steps, int) or self.steps < 2:
            raise ValueError(f"steps must be an integer >= 2 (the schedule has steps-1 Euler updates), got {self.steps!r}")
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be positive, got {self.timestep_shift}")
        if not isinstance(self.cache, CacheConfig):
            raise TypeError(f"cache must be a CacheConfig, got {self.cache!r}")
        self.cache.validate(self.steps)
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cfg_interval"] = list(self.cfg_interval)
        return d

    @staticmethod
    def from_dict(d: dict) -> "SamplingParams":
        """Strict: every field must be present and none unknown — a parameter dropped between pipeline stages must
        be an error, never a silent default."""
        names = field_names()
        missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"sampling parameters incomplete: missing {missing}, unknown {unknown}")
        d = dict(d)
        d["cfg_interval"] = tuple(d["cfg_interval"])
        d["cache"] = CacheConfig(**d["cache"]) if isinstance(d["cache"], dict) else d["cache"]
        return SamplingParams(**d).validate()


def field_names() -> set[str]:
    return {f.name for f in fields(SamplingParams)}


# Image editing's own CFG settings (upstream's edit defaults, docs/DESIGN.md §1); other modes use the fields' own.
MODE_DEFAULTS: dict[str, dict] = {
    "img2img": {"cfg_text_scale": 4.0, "cfg_img_scale": 2.0, "cfg_interval": (0.0, 1.0),
                "cfg_renorm_type": "text_channel"},
}
_INTEGER_FIELDS = ("steps", "seed", "height", "width")
_REAL_FIELDS = ("timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_min")


def default_image_size(cfg) -> int:
    """text2img's default side: the model's whole latent position table (1024 for BAGEL-7B-MoT, upstream's
    default; 256 for ``tiny``)."""
    return cfg.max_latent_size * cfg.latent_downsample


def check_model_defaults(d: dict) -> dict:
    """A model config's ``generation`` overrides: known field names only (older files' ``num_timesteps`` is read as
    ``steps``); returns a plain dict."""
    d = dict(d)
    if "num_timesteps" in d:
        d.setdefault("steps", d.pop("num_timesteps"))
    unknown = sorted(set(d) - field_names())
    if unknown:
        raise ValueError(f"generation defaults name unknown sampling parameters {unknown}; "
                         f"known: {sorted(field_names())}")
    if "cfg_interval" in d:
        d["cfg_interval"] = tuple(d["cfg_interval"])
    return d


def _integer(name: str, v) -> int:
    """A Python int from an int-like (numpy integers included); bools and floats are errors, not truncations."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
    return int(v)


def _real(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {v!r} ({type(v).__name__})")
    return float(v)


def resolve_sampling(cfg, mode: str = "text2img", arg_names: dict[str, str] | None = None,
                     **overrides) -> SamplingParams:
    """A request's ``SamplingParams``: the field defaults, then the model's (``cfg.generation``), then the mode's
    (``MODE_DEFAULTS``), then ``overrides`` (a value of None means "not given"). text2img's height and width default
    to ``default_image_size(cfg)``; img2img's come from its input image (the caller passes them). Types are checked
    (an int where an int belongs, numbers elsewhere: a bool or a string is an error, not a coercion) and the result
    is validated. ``arg_names``: the caller's names of fields, for its error messages (the pipeline's
    ``num_inference_steps`` is ``steps``)."""
    names = arg_names or {}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - field_names())
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {sorted(field_names())}")
    side = default_image_size(cfg)
    values = {"height": side, "width": side, **cfg.generation, **MODE_DEFAULTS.get(mode, {})}
    for k, v in given.items():
        name = names.get(k, k)
        if k in _INTEGER_FIELDS:
            v = _integer(name, v)
        elif k in _REAL_FIELDS:
            v = _real(name, v)
        elif k == "cache":
            v = CacheConfig.of(v)
        elif k == "cfg_interval":
            if not isinstance(v, (tuple, list)) or len(v) != 2:
                raise ValueError(f"{name} must be two numbers (lo, hi), got {v!r}")
            v = (_real(name, v[0]), _real(name, v[1]))
        values[k] = v
    return replace(SamplingParams(), **values).validate()
