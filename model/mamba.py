"""Mamba-1 language model with an explicit slot-pool inference state.

Glossary: b batch, l length, D d_model, d d_inner (= expand * D), n d_state, r dt_rank,
w d_conv, V padded vocab, p state-pool slots. Parameter names follow mamba_ssm
(``backbone.embedding``, ``backbone.layers.{i}.mixer.*``), so its checkpoints load as-is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import (
    add_rms_norm,
    causal_conv1d,
    causal_conv1d_update,
    embed_rms_norm,
    linear_accumulate,
    mixer_in,
    mixer_in_fusable,
    mixer_out,
    selective_scan,
    selective_state_update,
    small_linear,
)
from model.config import MambaConfig
from model.state import InferenceState

# Rows up to which the fused decode step runs the state update and out_proj as one kernel
# (:func:`kernels.mixer_out`); beyond, as two. Whole 64-layer steps at the 2.8B shapes replayed
# on an H100: 2.451 -> 2.269 ms at one row, 2.614 -> 2.441 at two, but 2.69 -> 2.76 at four,
# where the one kernel's serial loop over rows costs more than the launch it saves.
MIXER_OUT_ROWS = 2


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class MambaMixer(nn.Module):
    """One Mamba-1 mixer: in_proj -> causal conv -> selective scan gated by silu(z) -> out_proj."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 conv_bias: bool = True, bias: bool = False, layer_idx: int = 0, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.d_inner, self.d_state, self.d_conv = expand * d_model, d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.layer_idx, self.backend = layer_idx, backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **kw)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **kw)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **kw)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)

    def _ssm_params(self, x: torch.Tensor):
        """x: (..., d) -> dt (..., d) without bias, B and C (..., n)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, hidden: torch.Tensor, state: InferenceState | None = None, slots: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill. hidden: (b, l, D) -> (b, l, D).

        With ``state`` the scan starts from the slots' states and writes the final ones back.
        ``lengths`` (b,) marks right-padded rows: past a row's length delta is 0, so its state
        passes through the padding unchanged, and its conv state is taken at its length.
        """
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (b, d, l) each, channel-last memory
        conv_w, conv_b = self.conv1d.weight[:, 0, :], self.conv1d.bias
        conv_pool = ssm_pool = None
        if state is not None:
            conv_pool, ssm_pool = state.layer(self.layer_idx)
        # With a pool, both kernels start from the slots' rows and write the final states back.
        xc, _ = causal_conv1d(x, conv_w, conv_b, "silu", lengths=lengths, conv_state=conv_pool,
                              state_indices=slots, backend=self.backend)
        dt, B, C = self._ssm_params(xc.transpose(1, 2))  # (b, l, d), (b, l, n), (b, l, n)
        A = -torch.exp(self.A_log.float())  # (d, n)
        y, _ = selective_scan(xc, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z,
                              self.dt_proj.bias.float(), True, lengths=lengths, state=ssm_pool, state_indices=slots,
                              backend=self.backend)
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden: torch.Tensor, state: InferenceState, slots: torch.Tensor,
             xproj: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step. hidden: (b, D), slots: (b,) -> (b, D); updates the slots in place.
        ``xproj`` (b, r + 2n) float32, zeroed: where x_proj's output is summed (else allocated)."""
        conv_pool, ssm_pool = state.layer(self.layer_idx)
        # in_proj and out_proj stay on cuBLAS beyond 16 rows (the fused step takes fewer): it
        # beat our kernel there in benchmarks/kernels.py.
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, d) each
        x = causal_conv1d_update(x, conv_pool, self.conv1d.weight[:, 0, :], self.conv1d.bias, "silu",
                                 state_indices=slots, backend=self.backend)
        if xproj is None:
            xproj = x.new_zeros(x.shape[0], self.x_proj.out_features, dtype=torch.float32)
        # x_proj (r + 2n = 192 outputs) and dt_proj (k = r) are narrow: our split-K kernel fills
        # the GPU at any batch, where cuBLAS runs a few programs (benchmarks/kernels.py).
        linear_accumulate(x, self.x_proj.weight, xproj, backend=self.backend, max_rows=None)
        dt_low, B, C = xproj.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # Small batches fold dt_proj into the step kernel; large ones use one GEMM (the kernel
        # would re-read dt_proj's weight once per sequence).
        fuse = x.shape[0] <= 16
        dt = dt_low if fuse else small_linear(dt_low, self.dt_proj.weight, None, self.backend, max_rows=None)
        # early: the kernel just before (x_proj or dt_proj) does not write the state.
        y = selective_state_update(ssm_pool, x, dt, self.A_log, B, C, self.D, z, self.dt_proj.bias, True,
                                   state_indices=slots, dt_proj_weight=self.dt_proj.weight if fuse else None,
                                   A_is_log=True, early=True, backend=self.backend)
        return self.out_proj(y)

    def step_fused(self, normed, state: InferenceState, slots: torch.Tensor, out: torch.Tensor,
                   xproj: torch.Tensor, ahead: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step for a few rows in three kernels: in_proj + conv + x_proj
        (:func:`kernels.mixer_in`), the state update with dt_proj fused, and out_proj adding into
        ``out`` (b, D) float32; up to ``MIXER_OUT_ROWS`` rows the last two are one kernel
        (:func:`kernels.mixer_out`). ``out`` and ``xproj`` (b, r + 2n) float32 arrive zeroed. ``ahead``:
        the first rows of the next weight read (the next layer's in_proj, or the LM head), which
        out_proj's kernel asks L2 to fetch as it ends; in_proj's kernel does the same for the
        first eighth of out_proj (hints only; kernels/triton/_pdl.py)."""
        conv_pool, ssm_pool = state.layer(self.layer_idx)
        x, z = mixer_in(normed, self.in_proj.weight, conv_pool, self.conv1d.weight[:, 0, :], self.conv1d.bias, slots,
                        self.x_proj.weight, xproj, prefetch=_head(self.out_proj.weight), backend=self.backend)
        if x.shape[0] <= MIXER_OUT_ROWS:
            return mixer_out(ssm_pool, x, z, xproj, self.A_log, self.D, self.dt_proj.bias, self.dt_proj.weight, slots,
                             self.out_proj.weight, out, prefetch=ahead, backend=self.backend)
        dt_low, B, C = xproj.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = selective_state_update(ssm_pool, x, dt_low, self.A_log, B, C, self.D, z, self.dt_proj.bias, True,
                                   state_indices=slots, dt_proj_weight=self.dt_proj.weight, A_is_log=True,
                                   early=True, backend=self.backend)
        return linear_accumulate(y, self.out_proj.weight, out, prefetch=ahead, backend=self.backend)


def _head(weight: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The first rows of ``weight``: an eighth of ``like``'s (by default its own), the part of the
    next weight read that the decode kernels prefetch into L2 ahead (measured best of 1/16-1/2)."""
    return weight[: max(1, (like if like is not None else weight).shape[0] // 8)]


class Block(nn.Module):
    """Pre-norm residual block: residual += hidden; hidden = mixer(norm(residual))."""

    def __init__(self, config: MambaConfig, layer_idx: int, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        c = config
        self.residual_in_fp32 = c.residual_in_fp32
        self.mixer = MambaMixer(c.d_model, c.d_state, c.d_conv, c.expand, c.dt_rank, c.conv_bias, c.bias,
                                layer_idx, backend, device=device, dtype=dtype)
        self.norm = RMSNorm(c.d_model, c.norm_eps, device=device, dtype=dtype)

    def _pre(self, hidden, residual):
        return add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps, self.residual_in_fp32,
                            backend=self.mixer.backend)

    def forward(self, hidden, residual, state=None, slots=None, lengths=None):
        normed, residual = self._pre(hidden, residual)
        return self.mixer(normed, state, slots, lengths), residual

    def step(self, hidden, residual, state, slots, xproj=None):
        normed, residual = self._pre(hidden, residual)
        return self.mixer.step(normed, state, slots, xproj), residual


class Backbone(nn.Module):
    def __init__(self, config: MambaConfig, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(config, i, backend, device, dtype) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps, device=device, dtype=dtype)

    def _final(self, hidden, residual):
        backend = self.layers[0].mixer.backend if len(self.layers) else "ref"
        return add_rms_norm(hidden, residual, self.norm_f.weight, self.norm_f.eps, backend=backend)[0]


class MambaLM(nn.Module):
    """Mamba-1 LM with a (tied) LM head. Prefill with :meth:`forward`, decode with :meth:`step`."""

    def __init__(self, config: MambaConfig, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config, backend, device, dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def set_backend(self, backend: str) -> None:
        for layer in self.backbone.layers:
            layer.mixer.backend = backend

    @property
    def backend(self) -> str:
        """The kernel backend the layers were asked for (``auto`` without layers)."""
        return self.backbone.layers[0].mixer.backend if len(self.backbone.layers) else "auto"

    def allocate_state(self, num_slots: int, dtype: torch.dtype | None = None, device=None,
                       ssm_dtype: torch.dtype = torch.float32) -> InferenceState:
        """A zeroed pool of ``num_slots`` recurrent-state slots for every layer (SSM states in ``ssm_dtype``)."""
        c, w = self.config, self.backbone.embedding.weight
        return InferenceState.allocate(num_slots, c.n_layer, c.d_inner, c.d_conv, c.d_state,
                                       dtype or w.dtype, device or w.device, ssm_dtype)

    def _embed(self, input_ids, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        return self.backbone.embedding(input_ids) if inputs_embeds is None else inputs_embeds

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                state: InferenceState | None = None, slots: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Prefill. input_ids: (b, l) int or inputs_embeds: (b, l, D).

        Returns logits (b, l, V), or (b, V) at each row's last valid position with ``last_only``.
        With ``state`` and ``slots`` (b,), starts from and writes back those slots' states;
        ``lengths`` (b,) gives the valid length of right-padded rows.
        """
        hidden = self._embed(input_ids, inputs_embeds)
        if state is not None and slots is None:
            raise ValueError("state needs slots")
        residual = None
        for layer in self.backbone.layers:
            hidden, residual = layer(hidden, residual, state, slots, lengths)
        hidden = self.backbone._final(hidden, residual)  # (b, l, D)
        if last_only:
            b, l = hidden.shape[:2]
            last = (lengths - 1) if lengths is not None else torch.full((b,), l - 1, device=hidden.device)
            hidden = hidden[torch.arange(b, device=hidden.device), last]  # (b, D)
        return self.lm_head(hidden)

    def step(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, *,
             state: InferenceState, slots: torch.Tensor) -> torch.Tensor:
        """One decode step. input_ids: (b,) or inputs_embeds: (b, D); slots: (b,). Returns logits (b, V)."""
        layers = self.backbone.layers
        embedding = self.backbone.embedding.weight
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        rows = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        fused = self._fuses_step(rows, embedding.device)
        r = layers[0].mixer.x_proj.out_features if len(layers) else 0  # dt_rank + 2 d_state
        # Every layer's float32 sums are zeroed at once: x_proj's, and with the fused step out_proj's.
        d = self.config.d_model if fused else 0
        if fused:
            reads = [layer.mixer.in_proj.weight for layer in layers[1:]] + [self.lm_head.weight]
            ahead = [_head(w, layers[0].mixer.in_proj.weight) for w in reads]  # same bytes from each
            first = layers[0]
            if input_ids is not None:  # the gather, the memset and the first norm in one kernel
                scratch = embedding.new_empty(len(layers), input_ids.shape[0], d + r, dtype=torch.float32)
                normed, residual = embed_rms_norm(input_ids, embedding, first.norm.weight, first.norm.eps,
                                                  first.residual_in_fp32, zero=scratch, backend=first.mixer.backend)
            else:
                scratch = inputs_embeds.new_zeros(len(layers), inputs_embeds.shape[0], d + r, dtype=torch.float32)
                normed, residual = first._pre(inputs_embeds, None)
            for i, layer in enumerate(layers):
                hidden = layer.mixer.step_fused(normed, state, slots, scratch[i, :, :d], scratch[i, :, d:], ahead[i])
                if i + 1 < len(layers):
                    normed, residual = layers[i + 1]._pre(hidden, residual)
        else:
            hidden, residual = self._embed(input_ids, inputs_embeds), None
            scratch = hidden.new_zeros(len(layers), hidden.shape[0], r, dtype=torch.float32)
            for i, layer in enumerate(layers):
                hidden, residual = layer.step(hidden, residual, state, slots, scratch[i])
        backend = layers[0].mixer.backend if len(layers) else "ref"
        return small_linear(self.backbone._final(hidden, residual), self.lm_head.weight, None, backend)

    def _fuses_step(self, rows: int, device) -> bool:
        """The fused decode step (:meth:`MambaMixer.step_fused`) runs where its Triton kernels
        do: few rows, no projection biases, and a backend that resolves to Triton."""
        if not len(self.backbone.layers):
            return False
        mixer = self.backbone.layers[0].mixer
        if mixer.in_proj.bias is not None or mixer.out_proj.bias is not None:
            return False
        grad = torch.is_grad_enabled() and mixer.in_proj.weight.requires_grad
        return mixer_in_fusable(rows, self.config.d_inner, device, mixer.backend, grad)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "MambaLM":
        """Random initialisation as in Mamba-1 (dt log-uniform in [1e-3, 1e-1], A = -[1..n], D = 1)."""
        if seed is not None:
            torch.manual_seed(seed)
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        for layer in self.backbone.layers:
            init_mixer(layer.mixer, rescale_layers=self.config.n_layer)
            layer.norm.weight.fill_(1.0)
        self.backbone.norm_f.weight.fill_(1.0)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        return self

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto") -> "MambaLM":
        """Load a mamba_ssm-layout or transformers-``MambaForCausalLM``-layout directory."""
        from model.checkpoint import load_mamba_lm

        return load_mamba_lm(path, device=device, dtype=dtype, backend=backend)

    def save_pretrained(self, path, layout: str = "mamba_ssm") -> None:
        """Write config.json + model.safetensors in the ``mamba_ssm`` or ``hf`` layout."""
        from model.checkpoint import save_mamba_lm

        save_mamba_lm(self, path, layout)


@torch.no_grad()
def init_mixer(mixer: MambaMixer, rescale_layers: int = 1, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
    """Mamba-1's initialisation of one mixer (the reference init of mamba_ssm's ``Mamba``)."""
    for lin in (mixer.in_proj, mixer.x_proj, mixer.out_proj):
        nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    mixer.conv1d.reset_parameters()
    # Prenorm residual rescale keeps the residual stream's variance flat with depth.
    mixer.out_proj.weight /= math.sqrt(rescale_layers)
    std = mixer.dt_rank ** -0.5
    nn.init.uniform_(mixer.dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(mixer.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=1e-4)
    mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    A = torch.arange(1, mixer.d_state + 1, dtype=torch.float32).repeat(mixer.d_inner, 1)
    mixer.A_log.copy_(torch.log(A))
    mixer.D.fill_(1.0)
