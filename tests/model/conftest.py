import pytest
import torch
from PIL import Image

from model import MambaConfig
from model.data.shapes import make_sample
from model.factory import create_vlmamba, tiny_vision_config
from model.tokenizer import train_bpe_tokenizer

TEXTS = ["What color is the circle?", "How many shapes are there?", "Describe the image.",
         "a red circle at top left and a blue square at center", "yes no 1 2 3 green purple orange"]


@pytest.fixture(scope="session")
def tokenizer_factory():
    return lambda: train_bpe_tokenizer(TEXTS * 4, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_vlm(tokenizer_factory):
    """(model, processor) of a random tiny SigLIP + vss_l2/bsm + Mamba VL-Mamba, float32."""
    llm = MambaConfig(d_model=32, n_layer=2, vocab_size=300, d_state=8)
    return create_vlmamba(tiny_vision_config("siglip"), llm, tokenizer_factory(), "vss_l2", "bsm", seed=0)


@pytest.fixture(scope="session")
def images():
    return [make_sample("test", i).image() for i in range(3)] + [Image.new("RGB", (48, 40), (10, 200, 30))]


def teacher_forced_logits(model, input_ids, pixel_values):
    """Logits from stepping one embedding at a time through the recurrent path. (1, l, V)"""
    embeds = model.embed(input_ids, model.encode_images(pixel_values) if pixel_values is not None else None)
    state, slot = model.allocate_state(2), torch.tensor([1])
    out = [model.llm.step(inputs_embeds=embeds[:, t], state=state, slots=slot) for t in range(embeds.shape[1])]
    return torch.stack(out, 1)
