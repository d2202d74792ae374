"""timm's VisionTransformer, as far as Cobra uses it, under timm's own parameter names.

Cobra's featurizers are ``timm.create_model(name, pretrained=True, num_classes=0, img_size=S)``
whose forward is ``get_intermediate_layers(n={len(blocks) - 2})``: the output of the
second-to-last block, prefix (class / register) tokens dropped, no final norm. This module
computes exactly that and keeps only the blocks it needs, so timm checkpoints load as they are
(the last block, final norm and pooling head are skipped). The recorded outputs of timm itself
pin it down (tests/model/test_cobra.py).

Glossary: i images, t tokens (prefix + patches), p patches, c width, h heads.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.cobra.config import TIMM_ARCHS, ViTConfig

# Checkpoint tensors the features never read: the blocks after the feature layer are filtered
# by index; these are the rest (final norm, pooling heads, classifier).
UNUSED = re.compile(r"^(norm|fc_norm|attn_pool|head)\.")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i, t, c = x.shape
        q, k, v = self.qkv(x).reshape(i, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (i, h, t, c/h)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(i, t, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()  # timm's default: the exact (erf) GELU, for SigLIP too
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))."""

    def __init__(self, c: ViTConfig, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(c.embed_dim, eps=c.norm_eps, **kw)
        self.attn = Attention(c.embed_dim, c.num_heads, **kw)
        self.ls1 = LayerScale(c.embed_dim, **kw) if c.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(c.embed_dim, eps=c.norm_eps, **kw)
        self.mlp = Mlp(c.embed_dim, c.mlp_hidden, **kw)
        self.ls2 = LayerScale(c.embed_dim, **kw) if c.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, c: ViTConfig, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(3, c.embed_dim, c.patch_size, stride=c.patch_size, device=device, dtype=dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (i, p, c), row-major patches


class TimmViT(nn.Module):
    """pixel_values (i, 3, S, S), normalized for this tower -> patch features (i, p, c) of the
    second-to-last block."""

    def __init__(self, config: ViTConfig, device=None, dtype=None):
        super().__init__()
        self.config = c = config
        kw = {"device": device, "dtype": dtype}
        self.patch_embed = PatchEmbed(c, **kw)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim, **kw)) if c.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, c.reg_tokens, c.embed_dim, **kw)) if c.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_pos, c.embed_dim, **kw))
        self.blocks = nn.ModuleList(Block(c, **kw) for _ in range(c.depth - 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))  # (i, p, c)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.config.no_embed_class:  # positions cover the patches only; prefix tokens come after
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed  # (i, t, c)
        for block in self.blocks:
            x = block(x)
        return x[:, self.config.num_prefix_tokens:]


def resample_pos_embed(pos: torch.Tensor, grid: int, num_prefix: int) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed``: (1, prefix + g0*g0, c) -> (1, prefix + grid*grid, c),
    bicubic with antialiasing in float32, as timm does when a checkpoint's size differs."""
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    old = math.isqrt(patches.shape[1])
    if old == grid:
        return pos
    c = patches.shape[-1]
    grid_2d = patches.float().reshape(1, old, old, c).permute(0, 3, 1, 2)  # (1, c, g0, g0)
    grid_2d = F.interpolate(grid_2d, size=(grid, grid), mode="bicubic", antialias=True)
    return torch.cat([prefix, grid_2d.permute(0, 2, 3, 1).reshape(1, grid * grid, c).to(pos.dtype)], dim=1)


def strip_checkpoint(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT state dict from a timm or an open_clip file (whose timm trunk is ``visual.trunk.``)."""
    for key in ("model", "state_dict"):  # training checkpoints nest the weights, as timm's loader allows
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    for prefix in ("visual.trunk.", "module.visual.trunk."):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def vit_config(arch: str, sd: dict[str, torch.Tensor], img_size: int, model_args: dict | None = None) -> ViTConfig:
    """The config of a timm ViT: shapes from its state dict, heads and layout from the architecture,
    overridden by a checkpoint's ``model_args``."""
    if arch not in TIMM_ARCHS:
        raise ValueError(f"unsupported timm architecture {arch!r}; supported: {', '.join(TIMM_ARCHS)}")
    a, args = TIMM_ARCHS[arch], model_args or {}
    if "mask_token" in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError(f"{arch}: not a timm-format ViT state dict (use the Hugging Face timm/ release)")
    w = sd["patch_embed.proj.weight"]  # (c, 3, patch, patch)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return ViTConfig(arch=arch, embed_dim=w.shape[0], depth=depth, num_heads=args.get("num_heads", a.num_heads),
                     mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0], patch_size=w.shape[-1], img_size=img_size,
                     class_token="cls_token" in sd, reg_tokens=sd["reg_token"].shape[1] if "reg_token" in sd else 0,
                     no_embed_class=args.get("no_embed_class", a.no_embed_class),
                     layer_scale="blocks.0.ls1.gamma" in sd)


def vit_state_dict(sd: dict[str, torch.Tensor], c: ViTConfig) -> dict[str, torch.Tensor]:
    """The tensors :class:`TimmViT` holds, position embedding resampled to ``c.img_size``."""
    out = {}
    for k, v in sd.items():
        if UNUSED.match(k) or (k.startswith("blocks.") and int(k.split(".")[1]) >= c.depth - 1):
            continue
        out[k] = v
    num_prefix = 0 if c.no_embed_class else c.num_prefix_tokens
    out["pos_embed"] = resample_pos_embed(out["pos_embed"], c.grid, num_prefix)
    return out


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def read_timm_dir(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A local timm checkpoint directory -> (state dict, ``model_args`` of its config.json)."""
    from model.cobra.load import read_tensors

    path = next((directory / n for n in WEIGHT_FILES if (directory / n).exists()), None)
    if path is None:
        raise FileNotFoundError(f"no timm weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")
    cfg = json.loads((directory / "config.json").read_text()) if (directory / "config.json").exists() else {}
    return strip_checkpoint(read_tensors(path)), dict(cfg.get("model_args") or {})
