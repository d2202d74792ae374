"""Recipes: complete, reproducible training setups. ``demo`` makes the bundled Shapes-VQA model."""

from __future__ import annotations

from dataclasses import dataclass

from model.config import MambaConfig
from model.factory import create_vlmamba, tiny_vision_config


@dataclass
class DemoRecipe:
    """A tiny VL-Mamba that learns Shapes-VQA from scratch (vision tower included).

    SigLIP-style ViT, 64 px, patch 8 -> 64 visual tokens; vss_l2 + bsm connector; 4-layer Mamba LM.
    """

    connector: str = "vss_l2"
    scan: str = "bsm"
    vit_width: int = 128
    vit_layers: int = 5
    d_model: int = 192
    n_layer: int = 4
    d_state: int = 16
    vocab_size: int = 400
    n_images: int = 200000
    max_steps: int = 4500
    batch_size: int = 192
    lr: float = 1.5e-3
    warmup_steps: int = 200
    seed: int = 0


def shapes_texts(n: int = 3000) -> list[str]:
    """Every question and answer wording of Shapes-VQA, to train the demo tokenizer on."""
    from model.data.shapes import make_sample

    texts = []
    for i in range(n):
        for qa in make_sample("train", i).qas:
            texts += [qa.question, qa.answer]
    return texts


def build_demo(recipe: DemoRecipe):
    """A freshly initialised demo model and its processor."""
    from model.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(shapes_texts(), vocab_size=recipe.vocab_size)
    vision = tiny_vision_config("siglip", image_size=64, patch_size=8, hidden=recipe.vit_width,
                                layers=recipe.vit_layers, heads=4)
    llm = MambaConfig(d_model=recipe.d_model, n_layer=recipe.n_layer, vocab_size=len(tok), d_state=recipe.d_state)
    return create_vlmamba(vision, llm, tok, recipe.connector, recipe.scan, seed=recipe.seed)
