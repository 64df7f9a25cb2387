"""MoshiVis hyper-parameters with Kyutai's field names, presets and validation (SPEC.md §2)."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Special token ids (SPEC.md §2), defined beside the kernels that read and write them: ZERO_TOKEN (-1)
# embeds as exact zeros; UNGENERATED (-2) is not produced yet, also what a warm-up frame outputs.
from moshivis_kernels.token_delays import UNGENERATED, ZERO_TOKEN  # noqa: F401  (part of this module's API)

# The text token that ends a run of padding (Kyutai's `end_of_text_padding_id`); with the padding token
# (`MoshiVisConfig.padding_token_id`) it carries no text: not shown, not counted by the repetition penalty.
END_OF_PADDING = 0


class ConfigError(ValueError):
    """An impossible or unsupported config value; the message names the field."""


# The moshika-vis delays: text 0, model audio 0,1,...,1, user audio 0,1,...,1.
_MOSHI_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]


@dataclass
class MoshiVisConfig:
    dim: int = 4096
    text_card: int = 32000
    padding_token_id: int = 3
    n_q: int = 16
    dep_q: int = 8
    audio_card: int = 2048
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    causal: bool = True
    context: int = 3000
    max_period: int = 10000
    gating: bool = True
    activation: str = "silu"
    norm: str = "rms_norm_f32"
    positional_embedding: str = "rope"
    depformer: bool = True
    depformer_dim: int = 1024
    depformer_dim_feedforward: int = 4224
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_multi_linear: bool = True
    depformer_context: int = 8
    depformer_gating: bool = True
    depformer_activation: str = "silu"
    depformer_pos_emb: str = "none"
    depformer_weights_per_step: bool = True
    delays: list[int] = field(default_factory=lambda: list(_MOSHI_DELAYS))
    cross_attention: bool = True
    xa_layers: list[int] = field(default_factory=list)
    xa_gating: str = "sigmoid"
    xa_conditional_gating: bool = True
    xa_shared: bool = True
    xa_gate_shared: bool = False
    xa_start: str = "start"
    xa_end: str = "end"
    xa_step: int = 1
    xa_delay: int = 0
    xa_dim: int | None = None
    image_encoder_dim: int = 1152
    num_image_tokens: int = 1024
    norm_xa: str = "rms_norm"
    temporal_norm: str = "real_rms_norm_f32"

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def hidden(self) -> int:
        """Temporal SwiGLU hidden size."""
        return _swiglu_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_head_dim(self) -> int:
        return self.depformer_dim // self.depformer_num_heads

    @property
    def depformer_hidden(self) -> int:
        return _swiglu_hidden(self.depformer_dim, self.depformer_dim_feedforward)

    @property
    def gate_dim(self) -> int:
        """Hidden size of the per-layer cross-attention gate MLP."""
        return int(0.125 * self.dim)

    @property
    def num_audio_in(self) -> int:
        """User audio codebooks fed to the model (n_q - dep_q)."""
        return self.n_q - self.dep_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def num_codebooks_out(self) -> int:
        """Tokens returned per frame: text + dep_q audio."""
        return 1 + self.dep_q

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        positive = ["dim", "text_card", "n_q", "dep_q", "audio_card", "num_heads", "num_layers",
                    "context", "max_period", "depformer_dim", "depformer_dim_feedforward",
                    "depformer_num_heads", "depformer_num_layers", "depformer_context",
                    "image_encoder_dim", "num_image_tokens"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if not self.hidden_scale > 0:
            raise ConfigError(f"config field 'hidden_scale' must be > 0, got {self.hidden_scale!r}")
        if self.dim % self.num_heads:
            raise ConfigError(f"config field 'dim' ({self.dim}) must be divisible by "
                              f"'num_heads' ({self.num_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config fields 'dim'/'num_heads' give an odd head_dim "
                              f"{self.head_dim}; RoPE needs pairs")
        if self.depformer_dim % self.depformer_num_heads:
            raise ConfigError(f"config field 'depformer_dim' ({self.depformer_dim}) must be "
                              f"divisible by 'depformer_num_heads' ({self.depformer_num_heads})")
        if self.dep_q > self.n_q:
            raise ConfigError(f"config field 'dep_q' ({self.dep_q}) must be <= 'n_q' ({self.n_q})")
        if self.n_q - self.dep_q != self.dep_q:
            raise ConfigError(f"config fields 'n_q' ({self.n_q}) and 'dep_q' ({self.dep_q}): "
                              "MoshiVis feeds as many user codebooks as it generates (n_q = 2*dep_q)")
        if not isinstance(self.delays, list) or len(self.delays) != self.n_q + 1:
            raise ConfigError(f"config field 'delays' must be a list of n_q + 1 = {self.n_q + 1} "
                              f"integers, got {self.delays!r}")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.delays):
            raise ConfigError(f"config field 'delays' must hold non-negative integers, got {self.delays!r}")
        if self.depformer_context < self.dep_q:
            raise ConfigError(f"config field 'depformer_context' ({self.depformer_context}) must be "
                              f">= 'dep_q' ({self.dep_q})")
        if self.gate_dim <= 0:
            raise ConfigError(f"config field 'dim' ({self.dim}) is too small for the gate MLP "
                              "(int(0.125*dim) must be >= 1)")
        # What this package implements; anything else is a different model.
        supported = {
            "positional_embedding": "rope", "activation": "silu", "depformer_activation": "silu",
            "depformer_pos_emb": "none", "norm": "rms_norm_f32", "temporal_norm": "real_rms_norm_f32",
            "norm_xa": "rms_norm", "xa_gating": "sigmoid", "causal": True, "gating": True,
            "depformer": True, "depformer_gating": True, "depformer_multi_linear": True,
            "depformer_weights_per_step": True, "cross_attention": True, "xa_shared": True,
            "xa_conditional_gating": True, "xa_gate_shared": False,
        }
        for name, expected in supported.items():
            if getattr(self, name) != expected:
                raise ConfigError(f"config field {name!r} = {getattr(self, name)!r} is not supported "
                                  f"(only {expected!r})")
        if self.xa_layers:
            raise ConfigError(f"config field 'xa_layers' = {self.xa_layers!r} is not supported "
                              "(cross-attention in every layer: [])")
        if self.xa_dim is not None and self.xa_dim != self.dim:
            raise ConfigError(f"config field 'xa_dim' = {self.xa_dim!r} is not supported (None or dim)")

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict) -> "MoshiVisConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(f"config: ignoring unknown fields {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "MoshiVisConfig":
        """The config in a JSON file; a missing, unreadable or non-object file is a ConfigError naming it."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"config {path} is not a JSON object: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} is not a JSON object (found a {type(values).__name__})")
        try:
            return cls.from_dict(values)
        except (ConfigError, TypeError) as e:  # TypeError: a field of the wrong kind, e.g. a list for an int
            raise ConfigError(f"config {path}: {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)


def _swiglu_hidden(dim: int, dim_feedforward: int) -> int:
    return 21 * dim // 8 if dim_feedforward == 4 * dim else 2 * dim_feedforward // 3


def moshika_vis() -> MoshiVisConfig:
    """The released model's sizes (SPEC.md §2)."""
    return MoshiVisConfig()


def tiny() -> MoshiVisConfig:
    """The sizes of `golden/tiny`."""
    return MoshiVisConfig(dim=64, text_card=48, audio_card=40, num_heads=4, num_layers=2, context=6,
                          depformer_dim=32, depformer_dim_feedforward=132, depformer_num_heads=4,
                          depformer_num_layers=2, image_encoder_dim=24, num_image_tokens=12)


def small() -> MoshiVisConfig:
    """A CPU-sized model with the real structure: the default for `make bench`."""
    return MoshiVisConfig(dim=512, text_card=2000, audio_card=256, num_heads=8, num_layers=4,
                          context=250, depformer_dim=256, depformer_dim_feedforward=1056,
                          depformer_num_heads=4, depformer_num_layers=2, image_encoder_dim=192,
                          num_image_tokens=256)


PRESETS = {"moshika-vis": moshika_vis, "tiny": tiny, "small": small}


def preset(name: str) -> MoshiVisConfig:
    key = name.replace("_", "-")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key]()
