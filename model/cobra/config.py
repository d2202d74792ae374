"""Configs of a Cobra model: the run's ``config.json`` ``model`` section, its ViT towers and LM.

Cobra (arXiv 2403.14520, code h-zhao1997/cobra) names its parts by registry ids; the tables
below map those ids to what they mean, as Cobra's ``cobra/models/materialize.py``,
``backbones/vision/{siglip_vit,dinosiglip_vit}.py`` and ``backbones/llm/mamba.py`` define them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from model.config import MambaConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TimmArch:
    """What a timm ViT architecture fixes beyond its weights' shapes.

    ``hub``: (repo, file) pairs where the Hugging Face cache may hold its weights, newest first.
    """

    num_heads: int
    no_embed_class: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tag: str
    hub: tuple[tuple[str, str], ...] = ()


def _siglip(name: str, heads: int, legacy_repo: str | None = None) -> TimmArch:
    hub = ((f"timm/{name}.webli", "model.safetensors"),)
    if legacy_repo:  # the open_clip repo that timm 0.9 (Cobra's pin) downloads
        hub += ((legacy_repo, "open_clip_pytorch_model.bin"), (legacy_repo, "open_clip_model.safetensors"))
    return TimmArch(heads, False, INCEPTION_MEAN, INCEPTION_STD, "webli", hub)


TIMM_ARCHS = {
    "vit_large_patch14_reg4_dinov2": TimmArch(
        16, True, IMAGENET_MEAN, IMAGENET_STD, "lvd142m",
        (("timm/vit_large_patch14_reg4_dinov2.lvd142m", "model.safetensors"),)),
    "vit_so400m_patch14_siglip_384": _siglip("vit_so400m_patch14_siglip_384", 16, "timm/ViT-SO400M-14-SigLIP-384"),
    "vit_so400m_patch14_siglip_224": _siglip("vit_so400m_patch14_siglip_224", 16, "timm/ViT-SO400M-14-SigLIP"),
    "vit_base_patch16_siglip_224": _siglip("vit_base_patch16_siglip_224", 12, "timm/ViT-B-16-SigLIP"),
    "vit_base_patch16_siglip_256": _siglip("vit_base_patch16_siglip_256", 12, "timm/ViT-B-16-SigLIP-256"),
    "vit_base_patch16_siglip_384": _siglip("vit_base_patch16_siglip_384", 12, "timm/ViT-B-16-SigLIP-384"),
}

# vision_backbone_id -> ((module name, timm architecture), ...), image size. Features of several
# featurizers are concatenated on the channel axis in this order (DINOv2 first).
VISION_BACKBONES: dict[str, tuple[tuple[tuple[str, str], ...], int]] = {
    "dinosiglip-vit-so-384px": ((("dino_featurizer", "vit_large_patch14_reg4_dinov2"),
                                 ("siglip_featurizer", "vit_so400m_patch14_siglip_384")), 384),
    "siglip-vit-so400m-384px": ((("featurizer", "vit_so400m_patch14_siglip_384"),), 384),
    "siglip-vit-so400m": ((("featurizer", "vit_so400m_patch14_siglip_224"),), 224),
    "siglip-vit-b16-224px": ((("featurizer", "vit_base_patch16_siglip_224"),), 224),
    "siglip-vit-b16-256px": ((("featurizer", "vit_base_patch16_siglip_256"),), 256),
    "siglip-vit-b16-384px": ((("featurizer", "vit_base_patch16_siglip_384"),), 384),
}
LLM_BACKBONES = ("mamba-2.8b-zephyr", "mamba-2.8b-slimpj", "mamba-2.8b", "mamba-1.4b")
PROJECTORS = ("linear", "gelu-mlp", "fused-gelu-mlp")
RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")


@dataclass
class ViTConfig:
    """One timm ViT featurizer. ``depth`` is the architecture's; the module keeps the first
    ``depth - 1`` blocks, since Cobra reads the output of the second-to-last one.

    ``model_args`` (timm's names: embed_dim, depth, num_heads, patch_size, ...) override the
    architecture's defaults, as a timm checkpoint's config.json may.
    """

    arch: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    patch_size: int
    img_size: int
    class_token: bool = False
    reg_tokens: int = 0
    no_embed_class: bool = False
    layer_scale: bool = False
    norm_eps: float = 1e-6

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_pos(self) -> int:
        return self.num_patches + (0 if self.no_embed_class else self.num_prefix_tokens)


@dataclass
class CobraConfig:
    """The ``model`` section of a Cobra run's config.json, plus what loading derives:
    the featurizers' configs (in concatenation order), the LM config and the image placeholder id."""

    model_id: str
    arch_specifier: str
    vision_backbone_id: str
    llm_backbone_id: str
    image_resize_strategy: str = "resize-naive"
    llm_max_length: int = 2048
    towers: dict[str, ViTConfig] = field(default_factory=dict)
    llm: MambaConfig | None = None
    image_token_id: int = -1

    def __post_init__(self):
        checks = [(self.vision_backbone_id in VISION_BACKBONES, "vision_backbone_id", tuple(VISION_BACKBONES)),
                  (self.llm_backbone_id in LLM_BACKBONES, "llm_backbone_id", LLM_BACKBONES),
                  (self.projector in PROJECTORS, "arch_specifier", PROJECTORS),
                  (self.image_resize_strategy in RESIZE_STRATEGIES, "image_resize_strategy", RESIZE_STRATEGIES)]
        for ok, name, known in checks:
            if not ok:
                raise ValueError(f"unsupported Cobra {name} {getattr(self, name)!r}; supported: {', '.join(known)}")

    @property
    def projector(self) -> str:
        """``no-align+fused-gelu-mlp`` -> ``fused-gelu-mlp`` (the prefix is a training-stage choice)."""
        return self.arch_specifier.rsplit("+", 1)[-1]

    @property
    def prompt_format(self) -> str:
        """Cobra's prompt builder: Zephyr chat for ``*-zephyr`` LMs, the plain In/Out format otherwise."""
        return "zephyr" if self.llm_backbone_id.endswith("zephyr") else "plain"

    @property
    def image_size(self) -> int:
        return VISION_BACKBONES[self.vision_backbone_id][1]

    @property
    def featurizers(self) -> tuple[tuple[str, str], ...]:
        return VISION_BACKBONES[self.vision_backbone_id][0]

    @property
    def vision_dim(self) -> int:
        return sum(t.embed_dim for t in self.towers.values())

    @property
    def num_patches(self) -> int:
        return next(iter(self.towers.values())).num_patches

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "CobraConfig":
        """From a whole run config.json (``{"model": {...}, "dataset": {...}, ...}``)."""
        m = run_config["model"]
        names = {f.name for f in dataclasses.fields(cls)} - {"towers", "llm", "image_token_id"}
        missing = {"model_id", "arch_specifier", "vision_backbone_id", "llm_backbone_id"} - set(m)
        if missing:
            raise ValueError(f"Cobra config.json: the model section lacks {sorted(missing)}")
        return cls(**{k: v for k, v in m.items() if k in names})
