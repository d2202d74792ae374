"""VL-Mamba: vision tower -> connector -> visual embeddings spliced at ``<image>`` -> Mamba LM.

Glossary: b batch, l length, i images, p patches per image, D d_model, V vocab.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.config import VLMambaConfig
from model.connector import Connector
from model.mamba import MambaLM
from model.state import InferenceState
from model.vision import VisionTower


class SplicedVLM(nn.Module):
    """An image encoder's embeddings spliced into a Mamba LM at placeholder positions: what the
    engine calls (``allocate_state``, ``embed``, ``forward``, ``step``). Subclasses set
    ``config`` (with ``image_token_id``) and ``llm``, and implement ``encode_images``."""

    config: object
    llm: MambaLM

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def allocate_state(self, num_slots: int, dtype=None, device=None, ssm_dtype=torch.float32) -> InferenceState:
        return self.llm.allocate_state(num_slots, dtype, device, ssm_dtype)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              n_image: int | None = None) -> torch.Tensor:
        """input_ids (b, l) -> (b, l, D) with image positions replaced, in row-major order, by
        ``image_embeds`` (i, p, D) — the images of row 0 first, then row 1, ... ``n_image``: how
        many image positions input_ids holds, where the caller knows (counting them on a GPU
        would make the host wait for every kernel queued before)."""
        is_image = input_ids == self.config.image_token_id
        embeds = self.llm.backbone.embedding(input_ids.masked_fill(is_image, 0))
        n = int(is_image.sum()) if n_image is None else n_image
        if n == 0:
            return embeds
        if image_embeds is None or image_embeds.shape[0] * image_embeds.shape[1] != n:
            got = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
            raise ValueError(f"{n} image positions in input_ids but {got} visual embeddings")
        return embeds.masked_scatter(is_image[..., None], image_embeds.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, state: InferenceState | None = None,
                slots: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Prefill over text and images. input_ids (b, l); pixel_values (i, C, H, W) or
        precomputed image_embeds (i, p, D). Returns logits (b, l, V), or (b, V) with ``last_only``;
        with ``state``/``slots`` the final recurrent states land in those slots."""
        if pixel_values is not None and image_embeds is None:
            image_embeds = self.encode_images(pixel_values)
        embeds = self.embed(input_ids, image_embeds)
        return self.llm(inputs_embeds=embeds, state=state, slots=slots, lengths=lengths, last_only=last_only)

    def step(self, input_ids: torch.Tensor, *, state: InferenceState, slots: torch.Tensor) -> torch.Tensor:
        """One decode step: input_ids (b,), slots (b,) -> logits (b, V)."""
        return self.llm.step(input_ids, state=state, slots=slots)

    @property
    def backend(self) -> str:
        """The LM's kernel backend; the engine's decode graphs take their argmax with it."""
        return self.llm.backend


class VLMamba(SplicedVLM):
    def __init__(self, config: VLMambaConfig, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision, device=device, dtype=dtype)
        self.connector = Connector(config.connector, backend, device=device, dtype=dtype)
        self.llm = MambaLM(config.llm, backend, device=device, dtype=dtype)

    def set_backend(self, backend: str) -> None:
        self.llm.set_backend(backend)
        if self.config.connector.kind != "mlp":
            self.connector.vss.mixer.backend = backend

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (i, 3, H, W) -> visual embeddings (i, p, D) in the LM's dtype."""
        feats = self.vision_tower(pixel_values)
        # The weights' dtype, not that of the VSS layer's SSM dynamics (A_log, D), which stay fp32.
        conn_dtype = next(p.dtype for n, p in self.connector.named_parameters() if not n.endswith(("A_log", ".D")))
        return self.connector(feats.to(conn_dtype)).to(self.llm.backbone.embedding.weight.dtype)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "VLMamba":
        """Fresh connector and LM (the vision tower keeps transformers' init)."""
        self.llm.init_weights(seed)
        self.connector.init_weights()
        return self

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
        from model.checkpoint_vlm import load_vlmamba

        return load_vlmamba(path, device=device, dtype=dtype, backend=backend)[0]

    def save_pretrained(self, path: str | Path, processor=None) -> None:
        from model.checkpoint_vlm import save_vlmamba

        save_vlmamba(self, path, processor)
