"""Reading and writing weights: mamba_ssm and transformers Mamba layouts, safetensors or torch.

Key renames live here and nowhere else. Internally parameters use mamba_ssm's names;
transformers' ``MambaForCausalLM`` differs only in ``backbone.embeddings`` (plural).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import MambaConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: single or sharded safetensors, or pytorch_model.bin."""
    d = Path(directory)
    index = next((d / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (d / n).exists()), None)
    if index is not None:
        files = sorted(set(read_json(index)["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(_load_file(d / f))
        return out
    for name in WEIGHT_FILES:
        if (d / name).exists():
            return _load_file(d / name)
    raise FileNotFoundError(f"no weights in {d}: expected one of {WEIGHT_FILES} (or a sharded index)")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def detect_lm_layout(cfg: dict) -> str:
    """``mamba_ssm`` (d_model, n_layer) or ``hf`` (transformers MambaConfig)."""
    if "d_model" in cfg and "n_layer" in cfg:
        return "mamba_ssm"
    if cfg.get("model_type") == "mamba" or "hidden_size" in cfg:
        if cfg.get("model_type") not in (None, "mamba"):
            raise ValueError(f"unsupported model_type {cfg['model_type']!r}: only Mamba-1 ('mamba') LMs load")
        return "hf"
    raise ValueError("config.json is neither a mamba_ssm nor a transformers Mamba config")


def lm_config_from_dir(directory: str | Path) -> MambaConfig:
    cfg = read_json(Path(directory) / "config.json")
    return MambaConfig.from_mamba_ssm(cfg) if detect_lm_layout(cfg) == "mamba_ssm" else MambaConfig.from_hf(cfg)


def hf_to_internal(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("backbone.embeddings.", "backbone.embedding.", 1): v for k, v in sd.items()}


def internal_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("backbone.embedding.", "backbone.embeddings.", 1): v for k, v in sd.items()}


def lm_state_dict_for_load(sd: dict[str, torch.Tensor], config: MambaConfig) -> dict[str, torch.Tensor]:
    """Normalise an LM state dict to our names; the tied head is dropped (re-tied after load)."""
    sd = hf_to_internal(sd)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def load_mamba_lm(directory: str | Path, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
    """Build a :class:`~model.mamba.MambaLM` on the meta device and assign the directory's weights."""
    from model.mamba import MambaLM

    config = lm_config_from_dir(directory)
    sd = lm_state_dict_for_load(load_state_dict(directory), config)
    return assign_weights(lambda: MambaLM(config, backend=backend, device="meta"), sd, device, dtype)


def assign_weights(build, sd: dict[str, torch.Tensor], device="cpu", dtype: torch.dtype | None = None,
                   keep_fp32: tuple[str, ...] = ("A_log", ".D")):
    """Build a module on meta with ``build()``, assign ``sd`` strictly, re-tie, cast and move.

    Parameters whose names end in ``keep_fp32`` stay float32 (SSM dynamics are precision-sensitive).
    """
    with torch.device("meta"):
        module = build()
    aliases: dict[int, list[str]] = {}  # tied weights: names sharing one parameter (the LM head and the embedding)
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    others = {n: [m for m in names if m != n] for names in aliases.values() for n in names}
    missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not any(m in sd for m in others.get(k, []))]  # a tie's other name holds it
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    retie(module)
    for name, p in module.named_parameters():
        want = torch.float32 if name.endswith(keep_fp32) else (dtype or p.dtype)
        p.data = p.data.to(device=device, dtype=want)
    _materialise_buffers(module, device)
    module.eval()
    return module


def _materialise_buffers(module, device) -> None:
    """Non-persistent buffers are not in checkpoints and stay on meta; rebuild the known ones."""
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            buf.data = buf.data.to(device)
            continue
        if not name.endswith("position_ids"):
            raise ValueError(f"buffer {name} is not in the checkpoint and cannot be rebuilt")
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        leaf = name.rsplit(".", 1)[-1]
        owner.register_buffer(leaf, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False)


def retie(module) -> None:
    from model.mamba import MambaLM

    for m in module.modules():
        if isinstance(m, MambaLM) and m.config.tie_embeddings:
            m.lm_head.weight = m.backbone.embedding.weight


def save_mamba_lm(model, directory: str | Path, layout: str = "mamba_ssm") -> None:
    if layout not in ("mamba_ssm", "hf"):
        raise ValueError("layout must be 'mamba_ssm' or 'hf'")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    c = model.config
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if c.tie_embeddings:
        sd.pop("lm_head.weight")
    if layout == "hf":
        sd = internal_to_hf(sd)
        cfg = {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "hidden_size": c.d_model,
               "num_hidden_layers": c.n_layer, "vocab_size": c.padded_vocab_size, "state_size": c.d_state,
               "conv_kernel": c.d_conv, "expand": c.expand, "time_step_rank": c.dt_rank,
               "layer_norm_epsilon": c.norm_eps, "use_conv_bias": c.conv_bias, "use_bias": c.bias,
               "residual_in_fp32": c.residual_in_fp32, "tie_word_embeddings": c.tie_embeddings}
    else:
        cfg = c.to_mamba_ssm()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    write_json(d / "config.json", cfg)
