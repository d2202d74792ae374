"""The vision tower: transformers' SigLIP or CLIP ViT, returning patch features of one layer.

Keys of this module match transformers' ``SiglipVisionModel`` / ``CLIPVisionModel``
(``vision_model.*``), so their checkpoints load under the ``vision_tower.`` prefix unchanged.
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
            self.vision_model = model_cls(hf_cfg).vision_model
        if dtype is not None:
            self.to(dtype)

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        out = self.vision_model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
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
    for k in ("transformers_version", "architectures", "_name_or_path", "model_type", "dtype", "torch_dtype"):
        hf_cfg.pop(k, None)
    return VisionConfig(kind=kind, hf_config=hf_cfg, feature_layer=feature_layer)


def load_vision_weights(directory: str | Path, kind: str) -> dict[str, torch.Tensor]:
    """The ``vision_model.*`` tensors of a local SigLIP / CLIP checkpoint (two-tower or vision-only)."""
    from model.checkpoint import load_state_dict

    sd = load_state_dict(directory)
    return {k: v for k, v in sd.items() if k.startswith("vision_model.")}


def image_processor_for(config: VisionConfig, directory: str | Path | None = None):
    """The matching transformers image processor: from ``directory`` if it has one, else from the config."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():  # the PIL processors give the same pixels without torchvision
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # noqa: F811
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor  # noqa: F811
    cls = SiglipImageProcessor if config.kind == "siglip" else CLIPImageProcessor
    if directory is not None and (Path(directory) / "preprocessor_config.json").exists():
        return cls.from_pretrained(directory)
    size = config.hf_config.get("image_size", 224)
    if config.kind == "siglip":
        return cls(size={"height": size, "width": size})
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
