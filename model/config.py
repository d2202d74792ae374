"""Dataclass configs, one per component, read from and written to ``config.json``.

``MambaConfig`` speaks the mamba_ssm vocabulary (d_model, n_layer, ...) and converts from
transformers' ``MambaConfig`` keys (hidden_size, state_size, ...). ``VLMambaConfig`` nests
the vision, connector and LM sections of a VL-Mamba checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def _pick(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class MambaConfig:
    """A Mamba-1 language model. ``dt_rank=None`` means ceil(d_model / 16) as in the paper."""

    d_model: int = 2560
    n_layer: int = 64
    vocab_size: int = 50277
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    pad_vocab_size_multiple: int = 8
    norm_eps: float = 1e-5
    conv_bias: bool = True
    bias: bool = False
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    d_inner: int = field(init=False)
    padded_vocab_size: int = field(init=False)

    def __post_init__(self):
        if self.dt_rank is None or self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        self.d_inner = self.expand * self.d_model
        m = self.pad_vocab_size_multiple
        self.padded_vocab_size = self.vocab_size + (-self.vocab_size) % m

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MambaConfig":
        return cls(**_pick(cls, d))

    @classmethod
    def from_mamba_ssm(cls, d: dict[str, Any]) -> "MambaConfig":
        """Read a mamba_ssm ``config.json`` (d_model, n_layer, ssm_cfg, rms_norm, ...)."""
        ssm = dict(d.get("ssm_cfg") or {})
        if ssm.get("layer", "Mamba1") != "Mamba1":
            raise ValueError(f"only Mamba-1 layers are supported, config asks for {ssm['layer']}")
        if not d.get("rms_norm", True):
            raise ValueError("only RMSNorm Mamba models are supported (rms_norm=false)")
        if d.get("attn_layer_idx"):
            raise ValueError("hybrid attention layers are not supported")
        keys = ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias")
        return cls(d_model=d["d_model"], n_layer=d["n_layer"], vocab_size=d["vocab_size"],
                   pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
                   residual_in_fp32=d.get("residual_in_fp32", True),
                   tie_embeddings=d.get("tie_embeddings", True), **{k: ssm[k] for k in keys if k in ssm})

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "MambaConfig":
        """Read a transformers ``MambaConfig`` dict (hidden_size, state_size, ...)."""
        return cls(d_model=d["hidden_size"], n_layer=d["num_hidden_layers"], vocab_size=d["vocab_size"],
                   d_state=d.get("state_size", 16), d_conv=d.get("conv_kernel", 4), expand=d.get("expand", 2),
                   dt_rank=d.get("time_step_rank", "auto"), pad_vocab_size_multiple=1,
                   norm_eps=d.get("layer_norm_epsilon", 1e-5), conv_bias=d.get("use_conv_bias", True),
                   bias=d.get("use_bias", False), residual_in_fp32=d.get("residual_in_fp32", True),
                   tie_embeddings=d.get("tie_word_embeddings", True))

    def to_mamba_ssm(self) -> dict[str, Any]:
        if self.norm_eps != 1e-5:  # mamba_ssm's config has no such field: its models all use 1e-5
            raise ValueError(f"the mamba_ssm layout cannot record norm_eps={self.norm_eps} (it always means 1e-5); "
                             "save this model with layout='hf'")
        return {"d_model": self.d_model, "n_layer": self.n_layer, "vocab_size": self.vocab_size,
                "ssm_cfg": {"d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand,
                            "dt_rank": self.dt_rank, "conv_bias": self.conv_bias, "bias": self.bias},
                "rms_norm": True, "residual_in_fp32": self.residual_in_fp32, "fused_add_norm": True,
                "pad_vocab_size_multiple": self.pad_vocab_size_multiple, "tie_embeddings": self.tie_embeddings}


@dataclass
class VisionConfig:
    """A ViT vision tower from transformers: ``kind`` is ``siglip`` or ``clip``.

    ``hf_config`` is the transformers vision config dict (SiglipVisionConfig / CLIPVisionConfig);
    ``feature_layer`` indexes ``hidden_states`` (-2: the penultimate layer's output).
    """

    kind: str = "siglip"
    hf_config: dict[str, Any] = field(default_factory=dict)
    feature_layer: int = -2

    def __post_init__(self):
        if self.kind not in ("siglip", "clip"):
            raise ValueError(f"vision kind must be 'siglip' or 'clip', got {self.kind!r}")

    @property
    def hidden_size(self) -> int:
        return self.hf_config.get("hidden_size", 768)

    @property
    def num_patches(self) -> int:
        side = self.hf_config.get("image_size", 224) // self.hf_config.get("patch_size", 16)
        return side * side

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        return cls(**_pick(cls, d))


CONNECTORS = ("mlp", "vss_mlp", "vss_l2")
SCANS = ("bsm", "csm")


@dataclass
class ConnectorConfig:
    """The MultiModal Connector: ``kind`` in mlp | vss_mlp | vss_l2, ``scan`` in bsm | csm."""

    kind: str = "vss_l2"
    scan: str = "bsm"
    vision_dim: int = 1152
    llm_dim: int = 2560
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.kind not in CONNECTORS:
            raise ValueError(f"connector must be one of {CONNECTORS}, got {self.kind!r}")
        if self.scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {self.scan!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConnectorConfig":
        return cls(**_pick(cls, d))


@dataclass
class VLMambaConfig:
    """A whole VL-Mamba: vision tower, connector, Mamba LM and the image placeholder token."""

    vision: VisionConfig
    connector: ConnectorConfig
    llm: MambaConfig
    image_token: str = "<image>"
    image_token_id: int = 0
    model_type: str = "vlmamba"

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "image_token": self.image_token,
                "image_token_id": self.image_token_id, "vision": self.vision.to_dict(),
                "connector": self.connector.to_dict(), "llm": self.llm.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLMambaConfig":
        if d.get("model_type", "vlmamba") != "vlmamba":
            raise ValueError(f"not a VL-Mamba config: model_type={d.get('model_type')!r}")
        return cls(vision=VisionConfig.from_dict(d["vision"]), connector=ConnectorConfig.from_dict(d["connector"]),
                   llm=MambaConfig.from_dict(d["llm"]), image_token=d.get("image_token", "<image>"),
                   image_token_id=d["image_token_id"])
