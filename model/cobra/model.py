"""Cobra: timm ViT featurizer(s) -> MLP projector -> patch embeddings in front of the text -> Mamba LM.

Module names follow Cobra's ``CobraVLM`` (cobra/models/vlms/cobra.py), so its checkpoint
sections load without renames: ``vision_backbone.{dino_featurizer,siglip_featurizer,featurizer}.*``
(timm names), ``projector.projector.{0,2,4}.*`` and ``llm.backbone.*`` (mamba_ssm names).

Cobra's forward concatenates ``[projected patches, embeddings of the prompt tokens]``. Here
the processor puts ``p`` placeholder ids in front of the prompt's ids and :meth:`embed`
replaces them with the projected patches, so the LM reads the same sequence while the engine
keeps treating a prompt as one list of ids (prefix cache, batching).

Glossary: b batch, l length, i images, p patches per image, c vision width, D d_model.
"""

from __future__ import annotations

import torch
from torch import nn

from model.cobra.config import CobraConfig
from model.cobra.vit import TimmViT
from model.mamba import MambaLM
from model.vlmamba import SplicedVLM


class VisionBackbone(nn.Module):
    """pixel_values (i, 3k, S, S), k featurizers' normalized pixels stacked on channels ->
    patch features (i, p, c_1 + ... + c_k), concatenated in featurizer order as Cobra does."""

    def __init__(self, config: CobraConfig, device=None, dtype=None):
        super().__init__()
        self.names = list(config.towers)
        for name, tower in config.towers.items():
            self.add_module(name, TimmViT(tower, device=device, dtype=dtype))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        chunks = pixel_values.split(3, dim=1)
        if len(chunks) != len(self.names):
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels, expected {3 * len(self.names)}")
        return torch.cat([getattr(self, n)(x) for n, x in zip(self.names, chunks)], dim=2)


class Projector(nn.Module):
    """Cobra's projectors (cobra/util/nn_utils.py): ``linear``; ``gelu-mlp`` = Linear-GELU-Linear;
    ``fused-gelu-mlp`` = Linear(c, 4c)-GELU-Linear(4c, D)-GELU-Linear(D, D)."""

    def __init__(self, kind: str, vision_dim: int, llm_dim: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        if kind == "linear":
            self.projector = nn.Linear(vision_dim, llm_dim, **kw)
        elif kind == "gelu-mlp":
            self.projector = nn.Sequential(nn.Linear(vision_dim, llm_dim, **kw), nn.GELU(),
                                           nn.Linear(llm_dim, llm_dim, **kw))
        elif kind == "fused-gelu-mlp":
            hidden = 4 * vision_dim
            self.projector = nn.Sequential(nn.Linear(vision_dim, hidden, **kw), nn.GELU(),
                                           nn.Linear(hidden, llm_dim, **kw), nn.GELU(),
                                           nn.Linear(llm_dim, llm_dim, **kw))
        else:
            raise ValueError(f"unknown Cobra projector {kind!r}")

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.projector(patches)


class CobraVLM(SplicedVLM):
    """Cobra's parts behind :class:`~model.vlmamba.SplicedVLM`, so the engine serves it unchanged:
    ``embed`` puts the projected patches at the placeholder ids the processor leads the prompt with."""

    def __init__(self, config: CobraConfig, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.config = config
        self.vision_backbone = VisionBackbone(config, device=device, dtype=dtype)
        self.projector = Projector(config.projector, config.vision_dim, config.llm.d_model, device=device, dtype=dtype)
        self.llm = MambaLM(config.llm, backend, device=device, dtype=dtype)

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def set_backend(self, backend: str) -> None:
        self.llm.set_backend(backend)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (i, 3k, S, S) -> projected patch embeddings (i, p, D) in the LM's dtype."""
        feats = self.vision_backbone(pixel_values)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(proj_dtype)).to(self.llm.backbone.embedding.weight.dtype)
