import pytest

from model import MambaConfig
from model.factory import create_vlmamba, tiny_vision_config
from model.training.recipes import shapes_texts
from model.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="session")
def shapes_tokenizer():
    return train_bpe_tokenizer(shapes_texts(300), vocab_size=300)


@pytest.fixture
def fresh_vlm(shapes_tokenizer):
    """A new tiny random VL-Mamba each test (training mutates it)."""
    import copy

    llm = MambaConfig(d_model=32, n_layer=2, vocab_size=300, d_state=8)
    return create_vlmamba(tiny_vision_config("siglip"), llm, copy.deepcopy(shapes_tokenizer), "vss_l2", "bsm", seed=0)
