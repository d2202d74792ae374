"""Tiny Cobra parts for tests: timm ViT weights with exact, machine-independent values, and
the golden features timm computed from them (``data/cobra_timm_golden.safetensors``, written by
``cobra_golden_record.py`` with timm itself).

The tiny ViTs are timm's own architectures (``vit_large_patch14_reg4_dinov2``,
``vit_so400m_patch14_siglip_384``) with smaller ``model_args``. Their weights are a pure
function of each parameter's name and shape (integer hashing, then a division by a power of
two), so the recording machine and every test machine hold bit-identical tensors without
shipping them.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "data" / "cobra_timm_golden.safetensors"
IMAGE_SIZE = 384  # Cobra's size for its 384px backbones; patch 48 keeps the grid at 8 x 8
TOWERS = {
    "dino": {"arch": "vit_large_patch14_reg4_dinov2", "tag": "lvd142m", "file_img_size": 480,
             "model_args": {"embed_dim": 16, "depth": 3, "num_heads": 2, "patch_size": 48}},
    "siglip": {"arch": "vit_so400m_patch14_siglip_384", "tag": "webli", "file_img_size": 384,
               "model_args": {"embed_dim": 16, "depth": 3, "num_heads": 2, "patch_size": 48}},
}
TRANSFORM_SIZE = 24  # the image-transform goldens are recorded at this size (small fixtures)
STRATEGIES = ("resize-naive", "resize-crop", "letterbox")


def hashed_uniform(shape, salt: int) -> torch.Tensor:
    """Values in [-0.5, 0.5) with 16-bit mantissas: exact in float32 on any machine."""
    n = 1
    for s in shape:
        n *= s
    x = (torch.arange(n, dtype=torch.int64) + salt * 0x9E3779B9) & 0xFFFFFFFF
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return ((x & 0xFFFF).to(torch.float32) / 65536.0 - 0.5).reshape(shape)


def tiny_weights(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A timm state dict for ``shapes``: norms near 1, layer scales near 0.5, the rest small."""
    out = {}
    for key, shape in shapes.items():
        u = hashed_uniform(shape, zlib.crc32(key.encode()))
        if "norm" in key and key.endswith("weight"):
            out[key] = 1.0 + 0.25 * u
        elif key.endswith("gamma"):
            out[key] = 0.5 + 0.5 * u
        elif key.endswith(("bias", "_token", "pos_embed", "latent")):
            out[key] = 0.25 * u
        else:
            out[key] = 0.5 * u
    return out


def probe_pixels(n: int = 1, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Deterministic normalized-looking pixels (n, 3, size, size) in [-1, 1]."""
    i = torch.arange(n * 3 * size * size, dtype=torch.int64)
    return (((i * 7919) % 251).to(torch.float32) / 125.0 - 1.0).reshape(n, 3, size, size)


def probe_images() -> list[torch.Tensor]:
    """Two small RGB images (h, w, 3) uint8: a landscape and a portrait (odd padding for letterbox)."""
    return [(hashed_uniform((h, w, 3), salt) * 255 + 128).to(torch.uint8)
            for h, w, salt in ((23, 37, 1), (31, 20, 2))]


def load_golden() -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(GOLDEN), "pt") as f:
        meta = json.loads(f.metadata()["golden"])
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def write_timm_dir(directory: Path, tower: str, shapes: dict[str, list[int]], prefix: str = "") -> Path:
    """A local timm checkpoint as the Hugging Face ``timm/`` repos hold it: config.json with the
    architecture and ``model_args``, and model.safetensors (``prefix``: an open_clip-style file)."""
    from safetensors.torch import save_file

    spec = TOWERS[tower]
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": spec["arch"], "num_classes": 0, "model_args": dict(spec["model_args"]),
           "pretrained_cfg": {"tag": spec["tag"], "input_size": [3, spec["file_img_size"], spec["file_img_size"]]}}
    cfg["model_args"]["img_size"] = spec["file_img_size"]
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = {prefix + k: v for k, v in tiny_weights(shapes).items()}
    name = "open_clip_model.safetensors" if prefix else "model.safetensors"
    save_file(sd, str(directory / name))
    return directory


# ---- a whole Cobra run directory -------------------------------------------------------------
TEXTS = ["What is in the image?", "Describe the picture in detail.", "How many shapes are there?",
         "A red circle and a blue square on a white background.", "yes no 1 2 3 green purple orange",
         "<|user|>\n", "<|assistant|>\n", "In: ", "\nOut: "]
SPECIALS = ["<|endoftext|>", "<|padding|>"]  # ids 0 and 1, as in GPT-NeoX's vocabulary


def gpt_neox_like_tokenizer(directory: Path, vocab_size: int = 300) -> None:
    """tokenizer.json + tokenizer_config.json shaped like EleutherAI/gpt-neox-20b's (byte-level
    BPE, ``<|endoftext|>`` as bos/eos/unk, no BOS added), on a tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 4, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_prefix_space": False, "add_bos_token": False, "add_eos_token": False}))


def run_config(vision_backbone_id: str, llm_backbone_id: str, arch_specifier: str) -> dict:
    """A config.json as Cobra's scripts/pretrain.py dumps it (draccus, then JSON)."""
    return {"model": {"type": "cobra+3b", "model_id": "cobra+3b", "arch_specifier": arch_specifier,
                      "vision_backbone_id": vision_backbone_id, "llm_backbone_id": llm_backbone_id,
                      "image_resize_strategy": "resize-naive", "llm_max_length": 2048, "align_epochs": 1,
                      "align_max_steps": None, "align_global_batch_size": 256, "finetune_epochs": 2,
                      "finetune_global_batch_size": 128, "finetune_learning_rate": 2e-05,
                      "enable_gradient_checkpointing": True, "enable_mixed_precision_training": True},
            "dataset": {"type": "llava-lvis4v-lrv", "dataset_id": "llava-lvis4v-lrv"},
            "stage": "finetune", "pretrained_checkpoint": None, "run_id": "cobra+3b+stage-finetune+x7",
            "run_root_dir": "runs", "seed": 7, "hf_token": ".hf_token", "trackers": ["jsonl", "wandb"]}


def cobra_projector_state(kind: str, vision_dim: int, llm_dim: int, seed: int) -> dict:
    """The ``projector`` section as Cobra's projector modules (cobra/util/nn_utils.py) name it."""
    from torch import nn

    torch.manual_seed(seed)
    if kind == "fused-gelu-mlp":
        seq = nn.Sequential(nn.Linear(vision_dim, 4 * vision_dim), nn.GELU(), nn.Linear(4 * vision_dim, llm_dim),
                            nn.GELU(), nn.Linear(llm_dim, llm_dim))
    elif kind == "gelu-mlp":
        seq = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
    else:
        seq = nn.Linear(vision_dim, llm_dim)
    return {f"projector.{k}": v for k, v in seq.state_dict().items()}


def write_cobra_dir(root: Path, vision_backbone_id: str = "dinosiglip-vit-so-384px",
                    llm_backbone_id: str = "mamba-2.8b-zephyr", arch_specifier: str = "no-align+fused-gelu-mlp",
                    d_model: int = 32, n_layer: int = 2, seed: int = 0, with_assets: bool = True) -> Path:
    """A Cobra run directory in Cobra's on-disk layout, with the timm weights and the tokenizer
    placed where docs/cobra.md says (``with_assets``)."""
    from model import MambaConfig
    from model.mamba import MambaLM

    _, meta = load_golden()
    towers = ["dino", "siglip"] if vision_backbone_id.startswith("dinosiglip") else ["siglip"]
    if with_assets:
        for t in towers:
            write_timm_dir(root / "timm" / f"{TOWERS[t]['arch']}.{TOWERS[t]['tag']}", t, meta["shapes"][t])
        gpt_neox_like_tokenizer(root)
    llm = MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=300, d_state=8)).init_weights(seed)
    vision_dim = sum(TOWERS[t]["model_args"]["embed_dim"] for t in towers)
    sections = {"projector": cobra_projector_state(arch_specifier.rsplit("+", 1)[-1], vision_dim, d_model, seed),
                "llm_backbone": {f"llm.{k}": v for k, v in llm.state_dict().items()}}
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"model": sections}, root / "checkpoints" / "latest-checkpoint.pt")
    (root / "config.json").write_text(json.dumps(run_config(vision_backbone_id, llm_backbone_id, arch_specifier),
                                                 indent=2))
    return root
