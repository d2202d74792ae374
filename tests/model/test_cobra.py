"""Cobra checkpoints: Cobra's on-disk layout loads, the vision path reproduces timm, the
projectors and the LM input are Cobra's, decoding equals prefill, prompts are Cobra's strings."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from model.checkpoint_vlm import load_vlmamba
from model.cobra import is_cobra_checkpoint, load_cobra
from model.cobra.image import CobraImageTransform
from model.cobra.model import CobraVLM
from model.cobra.processor import CobraProcessor
from model.cobra.prompt import render_prompt
from model.cobra.vit import TimmViT, read_timm_dir, vit_config, vit_state_dict
from model.demo import DEMO_CHECKPOINT
from model.errors import ImageCountMismatch, InvalidRequest
from tests.model.cobra_tiny import (IMAGE_SIZE, STRATEGIES, TOWERS, TRANSFORM_SIZE, load_golden, probe_images,
                                    probe_pixels, tiny_weights, write_cobra_dir, write_timm_dir)
from tests.model.conftest import teacher_forced_logits


@pytest.fixture(scope="module")
def golden():
    return load_golden()


@pytest.fixture(scope="module")
def cobra(tmp_path_factory):
    """(directory, model, processor): DINOv2 + SigLIP, fused-gelu-mlp, Zephyr, loaded the way
    ``vlmamba serve --checkpoint DIR`` loads it."""
    d = write_cobra_dir(tmp_path_factory.mktemp("runs") / "cobra+3b")
    model, proc = load_vlmamba(d)
    return d, model, proc


def _tower(golden, tower: str) -> TimmViT:
    arch, shapes = TOWERS[tower]["arch"], golden[1]["shapes"][tower]
    sd = tiny_weights(shapes)
    cfg = vit_config(arch, sd, IMAGE_SIZE, TOWERS[tower]["model_args"])
    vit = TimmViT(cfg)
    vit.load_state_dict(vit_state_dict(sd, cfg), strict=True)
    return vit.eval()


@pytest.mark.parametrize("tower", ["dino", "siglip"])
@torch.no_grad()
def test_featurizer_reproduces_timm_second_to_last_block(golden, tower):
    # The dino file is stored at 480 px (a 10 x 10 grid): its position embedding is resampled to 8 x 8
    # on load, as timm does for Cobra's 518 -> 384 px DINOv2.
    vit = _tower(golden, tower)
    assert len(vit.blocks) == golden[1]["depth"][tower] - 1
    got, ref = vit(probe_pixels(1)), golden[0][f"features.{tower}"]
    err = (got - ref).abs().max().item()
    print(f"{tower}: max |ours - timm {golden[1]['timm']}| = {err:.2e} (features ~{ref.abs().mean():.1f})")
    assert got.shape == ref.shape == (1, 64, 16)
    assert err <= 1e-4


def test_open_clip_file_loads_the_same_trunk(golden, tmp_path):
    shapes = golden[1]["shapes"]["siglip"]
    plain, _ = read_timm_dir(write_timm_dir(tmp_path / "a", "siglip", shapes))
    clip, args = read_timm_dir(write_timm_dir(tmp_path / "b", "siglip", shapes, prefix="visual.trunk."))
    assert plain.keys() == clip.keys() and all(torch.equal(plain[k], clip[k]) for k in plain)
    assert args["num_heads"] == 2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_image_transforms_match_torchvision(golden, strategy):
    transform = CobraImageTransform([TOWERS["dino"]["arch"], TOWERS["siglip"]["arch"]], TRANSFORM_SIZE, strategy)
    for i, im in enumerate(probe_images()):
        got = transform(Image.fromarray(im.numpy()))
        ref = torch.cat([golden[0][f"pixels.{t}.{strategy}.{i}"] for t in ("dino", "siglip")])
        err = (got - ref).abs().max().item()
        print(f"{strategy} image {i}: max diff {err:.1e}")
        assert got.shape == (6, TRANSFORM_SIZE, TRANSFORM_SIZE) and err <= 1e-6


@torch.no_grad()
def test_loads_cobra_layout_with_weights_in_place(cobra, golden):
    d, model, proc = cobra
    assert is_cobra_checkpoint(d) and not is_cobra_checkpoint(DEMO_CHECKPOINT)
    assert isinstance(model, CobraVLM) and isinstance(proc, CobraProcessor)
    sections = torch.load(d / "checkpoints" / "latest-checkpoint.pt", weights_only=True)["model"]
    own = model.state_dict()
    for k, v in sections["projector"].items():
        assert torch.equal(own["projector." + k], v), k
    for k, v in sections["llm_backbone"].items():
        assert torch.equal(own[k], v), k
    assert model.llm.lm_head.weight is model.llm.backbone.embedding.weight  # tied, as mamba_ssm's 2.8B models
    assert model.config.llm.vocab_size == 304 and proc.image_token_id == 300 == len(proc.tokenizer) - 1
    assert model.config.projector == "fused-gelu-mlp" and model.config.prompt_format == "zephyr"
    assert proc.num_image_tokens == 64
    # Features of the whole vision backbone: DINOv2's and SigLIP's, concatenated on channels.
    x = probe_pixels(1)
    feats = model.vision_backbone(torch.cat([x, x], dim=1))
    ref = torch.cat([golden[0]["features.dino"], golden[0]["features.siglip"]], dim=2)
    print(f"vision backbone: max diff {(feats - ref).abs().max().item():.2e}")
    assert feats.shape == (1, 64, 32) and (feats - ref).abs().max() <= 1e-4


def _reference_projector(section: dict, x: torch.Tensor) -> torch.Tensor:
    """Cobra's projector math from its state dict: Linear layers with GELU between (nn.GELU = exact)."""
    layers = sorted({int(k.split(".")[1]) for k in section if k.count(".") == 2}) or [None]
    for j, idx in enumerate(layers):
        pre = "projector." if idx is None else f"projector.{idx}."
        x = F.linear(x, section[pre + "weight"], section[pre + "bias"])
        if j < len(layers) - 1:
            x = F.gelu(x)
    return x


@pytest.mark.parametrize("backbone,arch,linears", [("dinosiglip-vit-so-384px", "no-align+fused-gelu-mlp", 3),
                                                   ("siglip-vit-so400m-384px", "no-align+gelu-mlp", 2),
                                                   ("siglip-vit-so400m-384px", "linear", 1)])
@torch.no_grad()
def test_projector_variants(tmp_path, backbone, arch, linears):
    d = write_cobra_dir(tmp_path / "run", backbone, "mamba-2.8b-zephyr", arch)
    model, proc = load_cobra(d, hf_cache=False)
    section = torch.load(d / "checkpoints" / "latest-checkpoint.pt", weights_only=True)["model"]["projector"]
    assert sum(isinstance(m, torch.nn.Linear) for m in model.projector.modules()) == linears
    pixels = proc.preprocess_images([Image.new("RGB", (40, 30), (30, 120, 200))])
    assert pixels.shape == (1, 3 * (2 if backbone.startswith("dino") else 1), IMAGE_SIZE, IMAGE_SIZE)
    got = model.encode_images(pixels)
    ref = _reference_projector(section, model.vision_backbone(pixels))
    print(f"{arch}: max diff {(got - ref).abs().max().item():.2e}")
    assert got.shape == (1, 64, 32) and torch.allclose(got, ref, atol=1e-5)


def _ask(text, image=True):
    return [{"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}]


@torch.no_grad()
def test_lm_reads_patches_then_prompt_like_cobra(cobra):
    _, model, proc = cobra
    image = Image.fromarray(probe_images()[0].numpy())
    enc = proc.encode_messages(_ask("What is in the image?"), [image])
    prompt_ids = proc.tokenizer(proc.render_prompt(_ask("What is in the image?")))["input_ids"]
    assert enc.input_ids == [proc.image_token_id] * 64 + prompt_ids  # no BOS: GPT-NeoX adds none
    patches = model.encode_images(enc.pixel_values)
    cobra_sequence = torch.cat([patches, model.llm.backbone.embedding(torch.tensor([prompt_ids]))], dim=1)
    assert torch.equal(model.embed(torch.tensor([enc.input_ids]), patches), cobra_sequence)


@pytest.mark.parametrize("with_image", [True, False])
@torch.no_grad()
def test_recurrent_decode_equals_prefill_with_image_in_front(cobra, with_image):
    _, model, proc = cobra
    images = [Image.fromarray(probe_images()[1].numpy())] if with_image else []
    enc = proc.encode_messages(_ask("Describe the picture in detail.", with_image), images)
    ids = torch.tensor([enc.input_ids])
    ref = model(ids, enc.pixel_values)
    got = teacher_forced_logits(model, ids, enc.pixel_values)
    err = (got - ref).abs().max().item()
    print(f"image={with_image}: max |step - prefill| = {err:.2e} over {ids.shape[1]} positions")
    assert err <= 1e-4
    # Continuing with step() after a prefill matches one longer prefill.
    state, slot = model.allocate_state(1), torch.tensor([0])
    model(ids, enc.pixel_values, state=state, slots=slot, last_only=True)
    nxt = model.step(torch.tensor([5]), state=state, slots=slot)
    full = model(torch.cat([ids, torch.tensor([[5]])], 1), enc.pixel_values)[:, -1]
    assert (nxt - full).abs().max() <= 1e-4


@torch.no_grad()
def test_bfloat16_load_keeps_ssm_parameters_in_float32(cobra):
    d, _, _ = cobra
    model, proc = load_vlmamba(d, dtype=torch.bfloat16)
    mixer = model.llm.backbone.layers[0].mixer
    assert mixer.A_log.dtype == torch.float32 and mixer.in_proj.weight.dtype == torch.bfloat16
    assert model.vision_backbone.siglip_featurizer.pos_embed.dtype == torch.bfloat16
    enc = proc.encode_messages(_ask("What is in the image?"), [Image.new("RGB", (20, 20))])
    assert torch.isfinite(model(torch.tensor([enc.input_ids]), enc.pixel_values).float()).all()


ZEPHYR_ONE = "<|user|>\nWhat is in the image?<|endoftext|>\n<|assistant|>\n"
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},  # Cobra's builders take no system prompt
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                 {"type": "text", "text": "  What is in the <image>image? \n"}]},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "And its size?"},
    {"role": "assistant", "content": ""},
    {"role": "user", "content": "Thanks"},
]


def test_zephyr_and_plain_prompt_strings():
    assert render_prompt(_ask("What is in the image?"), "zephyr") == ZEPHYR_ONE
    assert render_prompt(_ask("What is in the image?"), "plain") == "In: What is in the image?\nOut: "
    assert render_prompt(CONVERSATION, "zephyr") == (
        "<|user|>\nWhat is in the image?<|endoftext|>\n<|assistant|>\nA red circle.<|endoftext|>"
        "\n<|user|>\nAnd its size?<|endoftext|>\n<|assistant|>\n <|endoftext|>"
        "\n<|user|>\nThanks<|endoftext|>\n<|assistant|>\n")
    assert render_prompt(CONVERSATION, "plain") == (
        "In: What is in the image?\nOut: A red circle.<|endoftext|>\nIn: And its size?\nOut:  <|endoftext|>"
        "\nIn: Thanks\nOut: ")
    assert render_prompt(CONVERSATION[:3], "zephyr", add_generation_prompt=False).endswith("A red circle.<|endoftext|>")


@pytest.mark.parametrize("messages,match", [
    ([{"role": "assistant", "content": "hi"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be a user"),
    ([{"role": "system", "content": "s"}], "no user message"),
])
def test_prompt_errors_are_typed(messages, match):
    with pytest.raises(InvalidRequest, match=match):
        render_prompt(messages, "zephyr")


def test_processor_puts_the_one_image_in_front(cobra):
    _, _, proc = cobra
    text = proc.apply_chat_template(CONVERSATION)
    assert text.startswith("<image><|user|>\nWhat is in the image?") and text.count("<image>") == 1
    assert proc.apply_chat_template(_ask("hi", image=False)) == "<|user|>\nhi<|endoftext|>\n<|assistant|>\n"
    ids = proc.tokenize(text, 1)
    assert ids[:64] == [proc.image_token_id] * 64 and proc.image_token_id not in ids[64:]
    assert proc.eos_token_ids == [0]  # <|endoftext|>: Cobra's generate stops on it
    with pytest.raises(ImageCountMismatch):
        proc.tokenize(text, 2)
    with pytest.raises(InvalidRequest, match="one image per conversation"):
        proc.tokenize("<image><image>hi", 2)
    assert proc.preprocess_images([]) is None


def test_missing_timm_weights_or_tokenizer_say_where_they_go(tmp_path, golden):
    d = write_cobra_dir(tmp_path / "run", "siglip-vit-so400m-384px", with_assets=False)
    with pytest.raises(FileNotFoundError, match=r"timm/vit_so400m_patch14_siglip_384\.webli"):
        load_cobra(d, hf_cache=False)
    write_timm_dir(d / "timm" / "vit_so400m_patch14_siglip_384", "siglip", golden[1]["shapes"]["siglip"])
    with pytest.raises(FileNotFoundError, match="gpt-neox-20b"):
        load_cobra(d, hf_cache=False)


@torch.no_grad()
def test_checkpoint_with_vision_weights_needs_no_timm_files(tmp_path, golden, cobra):
    """A run trained with the vision backbone unfrozen stores it; the featurizers load from there."""
    d = write_cobra_dir(tmp_path / "run", with_assets=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((cobra[0] / name).read_bytes())
    ckpt = torch.load(d / "checkpoints" / "latest-checkpoint.pt", weights_only=True)
    stored = {n: tiny_weights(golden[1]["shapes"][n]) for n in ("dino", "siglip")}
    ckpt["model"]["vision_backbone"] = {f"{n}_featurizer.{k}": v for n, sd in stored.items() for k, v in sd.items()}
    torch.save(ckpt, d / "checkpoints" / "latest-checkpoint.pt")
    model, _ = load_cobra(d, hf_cache=False)
    dino = model.vision_backbone.dino_featurizer
    assert torch.equal(dino.blocks[1].attn.qkv.weight, stored["dino"]["blocks.1.attn.qkv.weight"])
    assert dino.pos_embed.shape == (1, 64, 16) and len(dino.blocks) == 2  # resampled 10 x 10 -> 8 x 8


def _cache_snapshot(cache: Path, repo: str) -> Path:
    """A repo snapshot laid out as huggingface_hub's cache holds it."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("0123abcd")
    return root / "snapshots" / "0123abcd"


@torch.no_grad()
def test_weights_and_tokenizer_found_in_the_hugging_face_cache(tmp_path, golden, cobra):
    """What Cobra's own loading left in the cache: SigLIP from the open_clip repo that timm 0.9
    downloads (trunk under ``visual.trunk.``), the tokenizer of mamba-2.8b-zephyr."""
    d = write_cobra_dir(tmp_path / "run", "siglip-vit-so400m-384px", with_assets=False)
    cache = tmp_path / "hub"
    snap = write_timm_dir(_cache_snapshot(cache, "timm/ViT-SO400M-14-SigLIP-384"), "siglip",
                          golden[1]["shapes"]["siglip"], prefix="visual.trunk.")
    sd = load_file(str(snap / "open_clip_model.safetensors"))
    (snap / "open_clip_model.safetensors").unlink()
    torch.save(sd, snap / "open_clip_pytorch_model.bin")  # the file timm 0.9 reads from that repo
    tok = _cache_snapshot(cache, "xiuyul/mamba-2.8b-zephyr")
    tok.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tok / name).write_bytes((cobra[0] / name).read_bytes())
    model, proc = load_cobra(d, hf_cache=cache)
    x = probe_pixels(1)
    err = (model.vision_backbone(x) - golden[0]["features.siglip"]).abs().max().item()
    print(f"siglip from the cache: max diff {err:.2e}")
    assert err <= 1e-4 and len(proc.tokenizer) == len(cobra[2].tokenizer)
