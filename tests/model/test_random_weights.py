import torch

from model.checkpoint_vlm import load_config, load_vlmamba
from model.demo import DEMO_CHECKPOINT
from model.generate import generate
from model.graphs import buckets_for
from model.sampling import SamplingParams


def test_random_weights_keep_the_shape_and_ignore_the_file():
    real, _ = load_vlmamba(DEMO_CHECKPOINT)
    rand, proc = load_vlmamba(DEMO_CHECKPOINT, random_weights=True, dtype=torch.bfloat16)
    a, b = real.state_dict(), rand.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    w = "llm.backbone.layers.0.mixer.in_proj.weight"
    assert b[w].dtype == torch.bfloat16 and not torch.allclose(a[w], b[w].float())
    assert rand.llm.backbone.layers[0].mixer.A_log.dtype == torch.float32  # SSM dynamics stay fp32
    assert {p.dtype for n, p in rand.named_parameters() if "A_log" not in n and n.split(".")[-1] != "D"} == \
        {torch.bfloat16}
    from model.data.shapes import make_sample

    image = make_sample("test", 0).image()
    msgs = [{"role": "user", "content": "<image>\nwhat is there?"}]
    out = generate(rand, proc, messages=msgs, images=[image],
                   params=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 4


def test_preset_has_the_2_8b_shape():
    cfg = load_config("model/configs/vlmamba-2.8b-so400m")
    assert (cfg.llm.d_model, cfg.llm.n_layer, cfg.llm.padded_vocab_size, cfg.llm.d_state) == (2560, 64, 50280, 16)
    assert cfg.vision.num_patches == 729 and cfg.connector.vision_dim == 1152


def test_graph_buckets():
    assert buckets_for(1) == [1]
    assert buckets_for(16) == [1, 2, 4, 8, 16]
    assert buckets_for(20) == [1, 2, 4, 8, 16, 20]
    assert buckets_for(1000) == [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_random_model_is_built_on_the_requested_device():
    """Every part, the transformers vision tower included, is created on the device asked for (meta
    here: the 3.2 B-parameter preset without allocating it), so a GPU model never sits half on the CPU."""
    from model.factory import random_vlmamba

    model = random_vlmamba(load_config("model/configs/vlmamba-2.8b-so400m"), device="meta", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) > 3e9
