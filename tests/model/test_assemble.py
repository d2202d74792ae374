import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, MambaConfig, MambaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from model.checkpoint_vlm import load_vlmamba
from server.cli import main as cli


def _vision_dir(tmp_path, kind):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    kw = dict(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=3, num_attention_heads=2,
              intermediate_size=48)
    torch.manual_seed(0)
    if kind == "siglip":
        model, proc = SiglipVisionModel(SiglipVisionConfig(**kw)), SiglipImageProcessorPil(size={"height": 32, "width": 32})
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**kw))
        proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    d = tmp_path / f"{kind}-vision"
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d, model


def _llm_dir(tmp_path, tokenizer):
    torch.manual_seed(1)
    lm = MambaForCausalLM(MambaConfig(vocab_size=304, hidden_size=32, state_size=8, num_hidden_layers=2))
    d = tmp_path / "mamba-lm"
    lm.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d, lm


@pytest.mark.parametrize("kind", ["siglip", "clip"])
@torch.no_grad()
def test_assemble_then_save_and_load_is_identical(kind, tmp_path, tokenizer_factory, images):
    vdir, vision = _vision_dir(tmp_path, kind)
    tok = tokenizer_factory()
    tok.chat_template = None  # assemble must supply the default template
    ldir, lm = _llm_dir(tmp_path, tok)
    out = tmp_path / "vlm"
    assert cli(["assemble", "--vision", str(vdir), "--llm", str(ldir), "--connector", "vss_l2", "--scan", "csm",
                "--out", str(out)]) == 0
    model, proc = load_vlmamba(out)
    assert model.config.connector.scan == "csm" and model.config.vision.kind == kind
    # The pretrained parts arrived unchanged.
    for k, v in vision.state_dict().items():
        if k.startswith("head."):  # SigLIP's pooling head is not needed for patch features
            assert k not in model.vision_tower.model.state_dict()
            continue
        assert torch.equal(model.vision_tower.model.state_dict()[k], v), k
    assert torch.equal(model.llm.backbone.embedding.weight, lm.backbone.embeddings.weight)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    enc = proc.encode_messages(msgs, images[:1])
    ids = torch.tensor([enc.input_ids])
    ref = model(ids, enc.pixel_values)
    model.save_pretrained(tmp_path / "again", proc)
    model2, proc2 = load_vlmamba(tmp_path / "again")
    enc2 = proc2.encode_messages(msgs, images[:1])
    assert enc2.input_ids == enc.input_ids
    assert torch.equal(model2(torch.tensor([enc2.input_ids]), enc2.pixel_values), ref)


def test_assemble_rejects_a_non_vision_checkpoint(tmp_path, tokenizer_factory):
    ldir, _ = _llm_dir(tmp_path, tokenizer_factory())
    with pytest.raises(ValueError, match="SigLIP or CLIP"):
        cli(["assemble", "--vision", str(ldir), "--llm", str(ldir), "--out", str(tmp_path / "x")])


def test_generate_command_streams_an_answer(tiny_vlm, images, tmp_path, capsys):
    model, proc = tiny_vlm
    model.save_pretrained(tmp_path / "ck", proc)
    images[0].save(tmp_path / "img.png")
    rc = cli(["generate", "--checkpoint", str(tmp_path / "ck"), "--image", str(tmp_path / "img.png"),
              "--prompt", "Describe the image.", "--max-tokens", "5"])
    cap = capsys.readouterr()
    assert rc == 0 and "finish_reason=" in cap.err and "5 tokens" in cap.err


@pytest.mark.parametrize("args,message", [(["--temperature", "3"], "temperature"), (["--max-tokens", "0"], "max_tokens"),
                                          (["--stop", ""], "stop"), (["--image", "/no/such/image.png"], "No such file")])
def test_generate_command_reports_bad_arguments_as_usage_errors(args, message, capsys):
    # Checked before any model loads (the checkpoint does not exist either).
    rc = cli(["generate", "--checkpoint", "/no/such/checkpoint", "--prompt", "hi", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("vlmamba generate: error:") and message in err and "Traceback" not in err


def test_a_tokenizer_without_an_end_token_gets_one_it_can_stop_on():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from model.checkpoint_vlm import prepare_tokenizer
    from model.tokenizer import EOS_TOKEN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["hello world the cat sat on the mat"] * 10,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert fast.eos_token is None
    image_id = prepare_tokenizer(fast)
    eos = fast.eos_token_id
    assert fast.eos_token == EOS_TOKEN and eos is not None and eos != image_id
    assert fast(EOS_TOKEN, add_special_tokens=False)["input_ids"] == [eos]  # one id, not its bytes
    turn = fast.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cat"}],
                                    tokenize=False)
    assert eos in fast(turn, add_special_tokens=False)["input_ids"]
