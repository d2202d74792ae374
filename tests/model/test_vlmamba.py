import pytest
import torch

from model import MambaConfig
from model.errors import ImageCountMismatch
from model.factory import create_vlmamba, tiny_vision_config
from model.vlmamba import VLMamba
from tests.model.conftest import teacher_forced_logits


def _messages(n_images, text="What color is the circle?"):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


@pytest.mark.parametrize("n_images", [0, 1, 2])
@torch.no_grad()
def test_recurrent_decode_equals_prefill_with_images(tiny_vlm, images, n_images):
    model, proc = tiny_vlm
    enc = proc.encode_messages(_messages(n_images), images[:n_images])
    assert len(enc.input_ids) > n_images * proc.num_image_tokens
    ids = torch.tensor([enc.input_ids])
    ref = model(ids, enc.pixel_values)
    got = teacher_forced_logits(model, ids, enc.pixel_values)
    err = (got - ref).abs().max().item()
    print(f"{n_images} images: max |step - prefill| = {err:.2e}")
    assert err <= 1e-4


@torch.no_grad()
def test_images_change_the_logits_and_positions_matter(tiny_vlm, images):
    model, proc = tiny_vlm
    a = proc.encode_messages(_messages(2), [images[0], images[1]])
    b = proc.encode_messages(_messages(2), [images[1], images[0]])
    la = model(torch.tensor([a.input_ids]), a.pixel_values)
    lb = model(torch.tensor([b.input_ids]), b.pixel_values)
    assert a.input_ids == b.input_ids
    # Identical text, swapped images: the logits over the image positions and after must differ.
    first = a.input_ids.index(model.config.image_token_id)
    assert torch.equal(la[:, :first], lb[:, :first])
    assert (la[:, first:] - lb[:, first:]).abs().max() > 1e-3


def test_image_count_mismatch_is_a_typed_error(tiny_vlm, images):
    _, proc = tiny_vlm
    with pytest.raises(ImageCountMismatch, match="1 image placeholders but 2 images"):
        proc.encode_messages(_messages(1), images[:2])
    enc = proc.encode("<image>\nDescribe the image.", images[:1])  # LLaVA-style raw prompts work too
    assert enc.num_images == 1
    assert repr(enc) == f"EncodedPrompt(len={len(enc.input_ids)}, images=1)"  # no token ids in logs


def test_text_that_mentions_the_image_marker_keeps_it_as_text(tiny_vlm, images):
    # A user asking about the HTML <image> tag: only image parts become placeholders.
    _, proc = tiny_vlm
    text = [{"role": "user", "content": "What is the <image> tag in HTML?"}]
    enc = proc.encode(proc.apply_chat_template(proc.escape_markers(text)), [])
    assert proc.image_token_id not in enc.input_ids
    assert "What is the <image> tag in HTML?" in proc.tokenizer.decode(enc.input_ids)
    mixed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there an <image> here?"}]}]
    enc = proc.encode(proc.apply_chat_template(proc.escape_markers(mixed)), images[:1])
    assert enc.input_ids.count(proc.image_token_id) == proc.num_image_tokens
    assert mixed[0]["content"][1]["text"] == "Is there an <image> here?"  # the caller's messages are untouched
    with pytest.raises(ImageCountMismatch):  # unescaped (training's conversations), the marker is a placeholder
        proc.encode(proc.apply_chat_template(text), [])


@pytest.mark.parametrize("kind", ["siglip", "clip"])
@torch.no_grad()
def test_vision_tower_takes_penultimate_patch_features(kind, tokenizer_factory, images):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    vcfg = tiny_vision_config(kind, layers=3)
    model, proc = create_vlmamba(vcfg, MambaConfig(d_model=16, n_layer=1, vocab_size=300), tokenizer_factory(), "mlp")
    pixels = proc.preprocess_images(images[:2])
    assert pixels.shape == (2, 3, 32, 32)
    feats = model.vision_tower(pixels)
    assert feats.shape == (2, 16, 32)  # (32 / 8)^2 patches; CLIP's class token is gone
    cls = SiglipVisionModel if kind == "siglip" else CLIPVisionModel
    cfg_cls = SiglipVisionConfig if kind == "siglip" else CLIPVisionConfig
    hf = cls(cfg_cls(**vcfg.hf_config)).eval()
    hf.load_state_dict(model.vision_tower.model.state_dict())
    hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(feats, hidden[:, 1:] if kind == "clip" else hidden)


@torch.no_grad()
def test_batched_right_padded_prefill_matches_single(tiny_vlm, images):
    model, proc = tiny_vlm
    encs = [proc.encode_messages(_messages(1, "Describe the image."), images[:1]),
            proc.encode_messages(_messages(2, "How many?"), images[1:3]),
            proc.encode_messages(_messages(0, "Hi"), [])]
    L = max(len(e.input_ids) for e in encs)
    ids = torch.zeros(3, L, dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
    pixels = torch.cat([e.pixel_values for e in encs if e.pixel_values is not None])
    lengths = torch.tensor([len(e.input_ids) for e in encs])
    state = model.allocate_state(3)
    last = model(ids, pixels, state=state, slots=torch.arange(3), lengths=lengths, last_only=True)
    for i, e in enumerate(encs):
        solo = model(torch.tensor([e.input_ids]), e.pixel_values, last_only=True)
        print(i, (last[i] - solo[0]).abs().max().item())
        torch.testing.assert_close(last[i], solo[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_save_and_load_round_trip(tiny_vlm, images, tmp_path):
    model, proc = tiny_vlm
    model.save_pretrained(tmp_path, proc)
    again = VLMamba.from_pretrained(tmp_path)
    from model.checkpoint_vlm import load_vlmamba

    _, proc2 = load_vlmamba(tmp_path)
    enc = proc.encode_messages(_messages(1), images[:1])
    enc2 = proc2.encode_messages(_messages(1), images[:1])
    assert enc.input_ids == enc2.input_ids and torch.equal(enc.pixel_values, enc2.pixel_values)
    ids = torch.tensor([enc.input_ids])
    assert torch.equal(model(ids, enc.pixel_values), again(ids, enc2.pixel_values))
