"""The vision tower: transformers' SigLIP or CLIP ViT, returning patch features of one layer.

The transformers model sits under ``model``; its parameter names are transformers' own, and
local checkpoints are read through transformers' ``from_pretrained`` so any layout it knows
(two-tower SigLIP / CLIP models, older ``vision_model.*`` names) loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.config import VisionConfig


def _classes(kind: str):
    if kind == "siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionConfig, SiglipVisionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionConfig, CLIPVisionModel


class VisionTower(nn.Module):
    """pixel_values (i, 3, H, W) -> patch features (i, p, c) of ``config.feature_layer``.

    i images, p patches (CLIP's class token dropped), c the ViT width.
    """

    def __init__(self, config: VisionConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        cfg_cls, model_cls = _classes(config.kind)
        hf_cfg = cfg_cls(**config.hf_config)
        hf_cfg._attn_implementation = "sdpa"
        with torch.device(device or "cpu"):
            self.model = model_cls(hf_cfg)
        if dtype is not None:
            self.to(dtype)

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config.feature_layer]  # (i, tokens, c)
        return feats[:, 1:] if self.config.kind == "clip" else feats


def vision_config_from_dir(directory: str | Path, feature_layer: int = -2) -> VisionConfig:
    """Read a local SigLIP / CLIP checkpoint's config (a full two-tower model or the vision part)."""
    import json

    cfg = json.loads((Path(directory) / "config.json").read_text())
    kind = "siglip" if cfg.get("model_type", "").startswith("siglip") else "clip"
    if cfg.get("model_type", "") not in ("siglip", "siglip_vision_model", "clip", "clip_vision_model"):
        raise ValueError(f"{directory}: expected a SigLIP or CLIP checkpoint, got model_type={cfg.get('model_type')!r}")
    cfg_cls, _ = _classes(kind)
    hf_cfg = cfg_cls.from_pretrained(directory).to_dict()
    if kind == "siglip":
        hf_cfg["vision_use_head"] = False  # the pooling head is never used for patch features
    for k in ("transformers_version", "architectures", "_name_or_path", "model_type", "dtype", "torch_dtype"):
        hf_cfg.pop(k, None)
    return VisionConfig(kind=kind, hf_config=hf_cfg, feature_layer=feature_layer)


def load_vision_weights(directory: str | Path, config: VisionConfig) -> dict[str, torch.Tensor]:
    """The vision tower's tensors from a local SigLIP / CLIP checkpoint, read by transformers."""
    cfg_cls, model_cls = _classes(config.kind)
    hf = model_cls.from_pretrained(str(directory), config=cfg_cls(**config.hf_config))
    return {k: v.detach().clone() for k, v in hf.state_dict().items()}


def image_processor_for(config: VisionConfig, directory: str | Path | None = None):
    """The matching transformers image processor: from ``directory`` if it has one, else from the config."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import CLIPImageProcessor, SiglipImageProcessor
    else:  # the PIL processors give the same pixels without torchvision
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    cls = SiglipImageProcessor if config.kind == "siglip" else CLIPImageProcessor
    if directory is not None and (Path(directory) / "preprocessor_config.json").exists():
        return cls.from_json_file(str(Path(directory) / "preprocessor_config.json"))
    size = config.hf_config.get("image_size", 224)
    if config.kind == "siglip":
        return cls(size={"height": size, "width": size})
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
