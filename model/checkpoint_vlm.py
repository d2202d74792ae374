"""VL-Mamba checkpoint directories (see docs/checkpoint-format.md) and ``assemble``.

A directory holds ``config.json`` (vision / connector / llm sections), ``model.safetensors``
(prefixes ``vision_tower.``, ``connector.``, ``llm.``), tokenizer files with a chat template,
and the image processor's ``preprocessor_config.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.checkpoint import assign_weights, lm_config_from_dir, lm_state_dict_for_load, load_state_dict, read_json, write_json
from model.config import ConnectorConfig, VLMambaConfig

log = logging.getLogger(__name__)


def load_config(path: str | Path) -> VLMambaConfig:
    return VLMambaConfig.from_dict(read_json(Path(path) / "config.json"))


def load_vlmamba(path: str | Path, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto",
                 random_weights: bool = False):
    """Returns ``(model, processor)`` for a checkpoint directory.

    With ``random_weights`` only config.json and the processor files are read, and the model
    is initialised randomly (seed 0) at that shape: benchmarks of a real model's size without
    its weights (e.g. ``model/configs/vlmamba-2.8b-so400m``).
    """
    from model.cobra import is_cobra_checkpoint, load_cobra
    from model.processor import VLMambaProcessor
    from model.vlmamba import VLMamba

    if is_cobra_checkpoint(path):  # a Cobra run directory as distributed (docs/cobra.md)
        if random_weights:
            raise ValueError("random weights are for VL-Mamba config directories, not Cobra checkpoints")
        return load_cobra(path, device=device, dtype=dtype, backend=backend)
    config = load_config(path)
    if random_weights:
        from model.factory import random_vlmamba

        log.info("initialising random weights at the shape of %s", config.llm)
        return random_vlmamba(config, 0, dtype, device, backend), VLMambaProcessor.from_pretrained(path, config)
    sd = load_state_dict(path)
    llm = {k[4:]: v for k, v in sd.items() if k.startswith("llm.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("llm.")}
    sd.update({"llm." + k: v for k, v in lm_state_dict_for_load(llm, config.llm).items()})
    model = assign_weights(lambda: VLMamba(config, backend), sd, device, dtype)
    return model, VLMambaProcessor.from_pretrained(path, config)


def save_vlmamba(model, path: str | Path, processor=None) -> None:
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.llm.tie_embeddings:
        sd.pop("llm.lm_head.weight")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    write_json(d / "config.json", model.config.to_dict())
    if processor is not None:
        processor.save_pretrained(d)


def prepare_tokenizer(tokenizer):
    """Give a tokenizer the ``<image>`` token and, if it has none, the default chat template."""
    from model.tokenizer import DEFAULT_CHAT_TEMPLATE, EOS_TOKEN, ensure_image_token

    image_id = ensure_image_token(tokenizer)
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.eos_token is None:
        # A special token of its own: generation stops on its id, and the chat template's end of
        # turn tokenizes to it (setting the attribute alone leaves it unknown to the vocabulary).
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    return image_id


def assemble(vision_dir, llm_dir, out_dir, connector: str = "vss_l2", scan: str = "bsm", tokenizer_dir=None,
             feature_layer: int = -2, seed: int = 0, dtype: torch.dtype | None = None):
    """Build a VL-Mamba checkpoint from a local SigLIP/CLIP dir and a local Mamba LM dir,
    with a freshly initialised connector. Returns ``(model, processor)``."""
    from transformers import AutoTokenizer

    from model.connector import Connector
    from model.processor import VLMambaProcessor
    from model.vision import image_processor_for, load_vision_weights, vision_config_from_dir
    from model.vlmamba import VLMamba

    vcfg = vision_config_from_dir(vision_dir, feature_layer)
    lcfg = lm_config_from_dir(llm_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or llm_dir))
    image_id = prepare_tokenizer(tokenizer)
    lm_sd = lm_state_dict_for_load(load_state_dict(llm_dir), lcfg)
    lm_sd = _fit_vocab(lm_sd, lcfg, len(tokenizer))
    ccfg = ConnectorConfig(kind=connector, scan=scan, vision_dim=vcfg.hidden_size, llm_dim=lcfg.d_model)
    config = VLMambaConfig(vision=vcfg, connector=ccfg, llm=lcfg, image_token_id=image_id)
    torch.manual_seed(seed)
    conn_sd = Connector(ccfg).init_weights().state_dict()
    sd = {"vision_tower.model." + k: v for k, v in load_vision_weights(vision_dir, vcfg).items()}
    sd.update({"connector." + k: v for k, v in conn_sd.items()})
    sd.update({"llm." + k: v for k, v in lm_sd.items()})
    model = assign_weights(lambda: VLMamba(config), sd, "cpu", dtype)
    processor = VLMambaProcessor(tokenizer, image_processor_for(vcfg, vision_dir), config)
    save_vlmamba(model, out_dir, processor)
    log.info("assembled %s: connector %s/%s, %d visual tokens per image", out_dir, connector, scan, vcfg.num_patches)
    return model, processor


def _fit_vocab(sd: dict, lcfg, n_tokens: int) -> dict:
    """Grow the embedding (and config) when the tokenizer outgrew the padded vocab."""
    if n_tokens <= lcfg.padded_vocab_size:
        return sd
    old = sd["backbone.embedding.weight"]
    lcfg.vocab_size = n_tokens
    lcfg.__post_init__()
    new = torch.empty(lcfg.padded_vocab_size, old.shape[1], dtype=old.dtype).normal_(std=0.02)
    new[: old.shape[0]] = old
    sd["backbone.embedding.weight"] = new
    if "lm_head.weight" in sd:
        head = torch.zeros_like(new)
        head[: old.shape[0]] = sd["lm_head.weight"]
        sd["lm_head.weight"] = head
    return sd
