"""Loading a Cobra run directory as Cobra distributes it (docs/cobra.md):

    DIR/config.json                         the run config; its ``model`` section names the parts
    DIR/checkpoints/latest-checkpoint.pt    torch.save({"model": {"projector": ..., "llm_backbone": ...}})

plus what Cobra itself downloads at load time and the user keeps locally: the timm weights of
each vision featurizer and the GPT-NeoX tokenizer. Each is looked up in DIR first, then in the
local Hugging Face cache (``hf_cache``: True for the default one, a folder, or False; nothing is
ever downloaded). Cobra's ``cobra/models/load.py`` is the reference.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from model.checkpoint import assign_weights
from model.cobra.config import TIMM_ARCHS, CobraConfig
from model.cobra.vit import WEIGHT_FILES, read_timm_dir, vit_config, vit_state_dict
from model.config import MambaConfig

log = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoints") / "latest-checkpoint.pt"
TOKENIZER_REPOS = {"zephyr": ("xiuyul/mamba-2.8b-zephyr", "EleutherAI/gpt-neox-20b"),
                   "plain": ("EleutherAI/gpt-neox-20b",)}


def is_cobra_checkpoint(path: str | Path) -> bool:
    """A directory with Cobra's run config.json (a ``model`` section) and its latest checkpoint."""
    d = Path(path)
    if not (d / "config.json").is_file() or not (d / CHECKPOINT).is_file():
        return False
    try:
        cfg = json.loads((d / "config.json").read_text())
    except ValueError:
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and "vision_backbone_id" in cfg["model"]


def read_tensors(path: Path) -> dict:
    """safetensors or a torch pickle (memory-mapped, tensors only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def mamba_config_from_weights(sd: dict[str, torch.Tensor], prefix: str = "llm.") -> MambaConfig:
    """The Mamba-1 LM config implied by mamba_ssm-named weights (Cobra's checkpoint has no LM config).

    The embedding's rows are the vocabulary already padded (50280 for the 2.8B models)."""
    emb = sd[prefix + "backbone.embedding.weight"]  # (V, D)
    mixer = prefix + "backbone.layers.0.mixer."
    n_layer = 1 + max(int(k[len(prefix):].split(".")[2]) for k in sd if k.startswith(prefix + "backbone.layers."))
    head = sd.get(prefix + "lm_head.weight")
    tied = head is None or head.data_ptr() == emb.data_ptr() or torch.equal(head, emb)
    return MambaConfig(d_model=emb.shape[1], n_layer=n_layer, vocab_size=emb.shape[0],
                       d_state=sd[mixer + "A_log"].shape[1], d_conv=sd[mixer + "conv1d.weight"].shape[-1],
                       expand=sd[mixer + "in_proj.weight"].shape[0] // 2 // emb.shape[1],
                       dt_rank=sd[mixer + "dt_proj.weight"].shape[1], conv_bias=mixer + "conv1d.bias" in sd,
                       bias=mixer + "in_proj.bias" in sd, tie_embeddings=tied)


def _cache_dir(hf_cache: bool | str | Path) -> str | None:
    return None if hf_cache is True else str(hf_cache)


def find_timm_dir(directory: Path, arch: str, hf_cache: bool | str | Path = True) -> Path | None:
    """Where a featurizer's timm weights are: DIR/timm/{arch}.{tag} or DIR/timm/{arch}, else the
    Hugging Face cache (the repos timm 1.x and Cobra's timm 0.9 download from)."""
    a = TIMM_ARCHS[arch]
    for d in (directory / "timm" / f"{arch}.{a.tag}", directory / "timm" / arch):
        if any((d / n).exists() for n in WEIGHT_FILES):
            return d
    if hf_cache is not False:
        from huggingface_hub import try_to_load_from_cache

        for repo, filename in a.hub:
            hit = try_to_load_from_cache(repo, filename, cache_dir=_cache_dir(hf_cache))
            if isinstance(hit, str):
                return Path(hit).parent
    return None


def vision_weights(directory: Path, config: CobraConfig, sections: dict, hf_cache: bool | str | Path) -> dict:
    """Featurizer configs into ``config.towers`` and their tensors, named as in :class:`CobraVLM`.

    A checkpoint trained with the vision backbone unfrozen carries it (``vision_backbone``);
    otherwise the timm files are read."""
    out, stored = {}, sections.get("vision_backbone")
    for name, arch in config.featurizers:
        if stored is not None:
            sd = {k[len(name) + 1:]: v for k, v in stored.items() if k.startswith(name + ".")}
            model_args = {}
        else:
            found = find_timm_dir(directory, arch, hf_cache)
            if found is None:
                raise FileNotFoundError(
                    f"{directory}: no timm weights for {arch}; put the files of the Hugging Face repo "
                    f"{TIMM_ARCHS[arch].hub[0][0]} (model.safetensors, config.json) in "
                    f"{directory / 'timm' / (arch + '.' + TIMM_ARCHS[arch].tag)} (docs/cobra.md)")
            sd, model_args = read_timm_dir(found)
        tower = vit_config(arch, sd, config.image_size, model_args)
        config.towers[name] = tower
        out.update({f"vision_backbone.{name}.{k}": v for k, v in vit_state_dict(sd, tower).items()})
    return out


def load_tokenizer(directory: Path, prompt_format: str, hf_cache: bool | str | Path = True):
    """GPT-NeoX's tokenizer: from DIR (tokenizer.json beside config.json, or DIR/tokenizer/), else cached."""
    from transformers import AutoTokenizer, PretrainedConfig

    for d in (directory, directory / "tokenizer"):
        if (d / "tokenizer.json").exists():
            # An empty config: DIR/config.json is Cobra's run config, not a transformers one.
            return AutoTokenizer.from_pretrained(str(d), config=PretrainedConfig())
    for repo in TOKENIZER_REPOS[prompt_format] if hf_cache is not False else ():
        try:
            return AutoTokenizer.from_pretrained(repo, local_files_only=True, cache_dir=_cache_dir(hf_cache),
                                                 config=PretrainedConfig())
        except OSError:
            continue
    raise FileNotFoundError(f"{directory}: no tokenizer; copy tokenizer.json and tokenizer_config.json of "
                            f"EleutherAI/gpt-neox-20b (or xiuyul/mamba-2.8b-zephyr) into it (docs/cobra.md)")


def load_cobra(path: str | Path, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto",
               hf_cache: bool | str | Path = True):
    """Returns ``(CobraVLM, CobraProcessor)`` for a Cobra run directory."""
    from model.cobra.image import CobraImageTransform
    from model.cobra.model import CobraVLM
    from model.cobra.processor import CobraProcessor

    d = Path(path)
    config = CobraConfig.from_run_config(json.loads((d / "config.json").read_text()))
    sections = read_tensors(d / CHECKPOINT)["model"]
    if "projector" not in sections or "llm_backbone" not in sections:
        raise ValueError(f"{d / CHECKPOINT}: expected the sections 'projector' and 'llm_backbone', "
                         f"got {sorted(sections)}")
    sd = vision_weights(d, config, sections, hf_cache)
    sd.update({"projector." + k: v for k, v in sections["projector"].items()})
    sd.update(sections["llm_backbone"])  # keys already read llm.backbone.* / llm.lm_head.weight
    config.llm = mamba_config_from_weights(sd)
    if config.llm.tie_embeddings:
        sd.pop("llm.lm_head.weight", None)
    processor = CobraProcessor(load_tokenizer(d, config.prompt_format, hf_cache),
                               CobraImageTransform([a for _, a in config.featurizers], config.image_size,
                                                   config.image_resize_strategy),
                               config.prompt_format, config.num_patches)
    config.image_token_id = processor.image_token_id
    if not len(processor.tokenizer) <= config.llm.padded_vocab_size:
        raise ValueError(f"the tokenizer has {len(processor.tokenizer)} tokens (with <image>) but the LM only "
                         f"{config.llm.padded_vocab_size} embedding rows: is it GPT-NeoX's tokenizer?")
    model = assign_weights(lambda: CobraVLM(config, backend), sd, device, dtype)
    log.info("loaded Cobra %s: %s + %s, projector %s, %d patches per image, %s prompts", config.model_id,
             config.vision_backbone_id, config.llm_backbone_id, config.projector, config.num_patches,
             config.prompt_format)
    return model, processor
