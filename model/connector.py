"""The MultiModal Connector (MMC) of VL-Mamba, paper eqs. for the three variants.

    mlp      V_out = MLP(V)                                   MLP = Linear-GELU-Linear
    vss_mlp  V_out = MLP(Norm(VSS(V) + V))
    vss_l2   V' = Linear(V);  V_out = Linear(Norm(VSS(GELU(V')) + V'))

VSS is a 2D scan feeding one Mamba mixer: the patch grid is read in K orders (``bsm``:
row-major forward and backward, K=2; ``csm``: row-major, column-major and both reversed,
K=4), the shared mixer runs on each sequence, every output is put back in patch order,
and the K results are summed. ``Norm`` is LayerNorm: the paper does not name it, and
LayerNorm is what its VSS block (from VMamba) uses.

Glossary: i images, p patches (a square grid of s x s), c channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import ConnectorConfig
from model.mamba import MambaMixer, init_mixer


def scan_orders(scan: str, p: int) -> list[torch.Tensor]:
    """The K patch orders of a scan over an s x s grid; each is a (p,) permutation of patch indices."""
    s = math.isqrt(p)
    if s * s != p:
        raise ValueError(f"2D scans need a square patch grid, got {p} patches")
    row = torch.arange(p)
    if scan == "bsm":
        return [row, row.flip(0)]
    if scan == "csm":
        col = row.view(s, s).t().reshape(-1)
        return [row, col, row.flip(0), col.flip(0)]
    raise ValueError(f"unknown scan {scan!r}")


class VSS(nn.Module):
    """2D selective scan + one Mamba mixer with weights shared across the scan orders.

    v: (i, p, c) -> (i, p, c), in patch order.
    """

    def __init__(self, dim: int, scan: str, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.scan = scan
        self.mixer = MambaMixer(dim, d_state, d_conv, expand, backend=backend, device=device, dtype=dtype)
        self._orders: dict[tuple, list[torch.Tensor]] = {}  # (p, device) -> scan orders on that device

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        i, p, _ = v.shape
        key = (p, v.device)
        if key not in self._orders:  # made once: a CUDA-graph capture allows no host-to-device copy
            self._orders[key] = [o.to(v.device) for o in scan_orders(self.scan, p)]
        orders = self._orders[key]
        # One mixer call over all orders: the K sequences ride along the batch axis.
        ys = self.mixer(torch.cat([v[:, o] for o in orders], dim=0)).split(i, dim=0)  # K x (i, p, c)
        out = torch.zeros_like(v)
        for y, o in zip(ys, orders):
            out[:, o] += y  # position t of order o is patch o[t]
        return out


def _mlp(d_in: int, d_out: int, kw) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out, **kw), nn.GELU(), nn.Linear(d_out, d_out, **kw))


class Connector(nn.Module):
    """Vision features (i, p, c_vision) -> LM input embeddings (i, p, d_model)."""

    def __init__(self, config: ConnectorConfig, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.config = c = config
        kw = {"device": device, "dtype": dtype}
        vss_dim = c.vision_dim if c.kind == "vss_mlp" else c.llm_dim
        if c.kind != "mlp":
            self.vss = VSS(vss_dim, c.scan, c.d_state, c.d_conv, c.expand, backend, **kw)
            self.norm = nn.LayerNorm(vss_dim, eps=c.norm_eps, **kw)
        if c.kind == "vss_l2":
            self.proj_in = nn.Linear(c.vision_dim, c.llm_dim, **kw)
            self.proj_out = nn.Linear(c.llm_dim, c.llm_dim, **kw)
        else:
            self.mlp = _mlp(c.vision_dim, c.llm_dim, kw)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        kind = self.config.kind
        if kind == "mlp":
            return self.mlp(v)
        if kind == "vss_mlp":
            return self.mlp(self.norm(self.vss(v) + v))
        v1 = self.proj_in(v)  # V' (i, p, d_model)
        return self.proj_out(self.norm(self.vss(nn.functional.gelu(v1)) + v1))

    @torch.no_grad()
    def init_weights(self) -> "Connector":
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        if self.config.kind != "mlp":
            init_mixer(self.vss.mixer)
        return self
