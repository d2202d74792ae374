"""Build a fresh (randomly initialised) VL-Mamba and its processor from configs.

Used for training from scratch (the demo model), for random-weight benchmarks, and by tests.
"""

from __future__ import annotations

import torch

from model.config import ConnectorConfig, MambaConfig, VisionConfig, VLMambaConfig


def create_vlmamba(vision: VisionConfig, llm: MambaConfig, tokenizer, connector: str = "vss_l2", scan: str = "bsm",
                   seed: int = 0, dtype: torch.dtype | None = None, device="cpu", **connector_kw):
    """Returns ``(model, processor)``; the tokenizer gets ``<image>`` and a chat template if missing."""
    from model.checkpoint_vlm import prepare_tokenizer
    from model.processor import VLMambaProcessor
    from model.vision import image_processor_for

    image_id = prepare_tokenizer(tokenizer)
    if len(tokenizer) > llm.padded_vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LM vocab is {llm.padded_vocab_size}")
    ccfg = ConnectorConfig(kind=connector, scan=scan, vision_dim=vision.hidden_size, llm_dim=llm.d_model,
                           **connector_kw)
    config = VLMambaConfig(vision=vision, connector=ccfg, llm=llm, image_token_id=image_id)
    return random_vlmamba(config, seed, dtype, device), VLMambaProcessor(tokenizer, image_processor_for(vision), config)


def random_vlmamba(config: VLMambaConfig, seed: int = 0, dtype: torch.dtype | None = None, device="cpu",
                   backend: str = "auto"):
    """A VL-Mamba of ``config`` with random weights, built on ``device`` (no CPU copy of a large model)."""
    from model.vlmamba import VLMamba

    torch.manual_seed(seed)
    model = VLMamba(config, backend, device=device).init_weights(seed)
    return cast_model(model, dtype).eval()


def cast_model(model, dtype: torch.dtype | None):
    """Cast weights to ``dtype``; the SSM dynamics (A_log, D) stay fp32 as in every checkpoint."""
    if dtype is not None:
        model.to(dtype)
        for m in model.modules():
            if hasattr(m, "A_log"):
                m.A_log.data, m.D.data = m.A_log.data.float(), m.D.data.float()
    return model


def tiny_vision_config(kind: str = "siglip", image_size: int = 32, patch_size: int = 8, hidden: int = 32,
                       layers: int = 2, heads: int = 2) -> VisionConfig:
    """A small ViT config of either family (for tests and the demo)."""
    hf = {"image_size": image_size, "patch_size": patch_size, "hidden_size": hidden, "num_hidden_layers": layers,
          "num_attention_heads": heads, "intermediate_size": 2 * hidden, "num_channels": 3}
    if kind == "siglip":
        hf["vision_use_head"] = False
    return VisionConfig(kind=kind, hf_config=hf)
