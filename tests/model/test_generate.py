import pytest
import torch

from model.detokenize import IncrementalDetokenizer, StopMatcher
from model.errors import InvalidRequest
from model.generate import SequenceDecoder, generate, pick_tokens
from model.sampling import SamplingParams, sample

MSGS = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]


def _logits(b=4, V=50, seed=0):
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_top_k1_and_tiny_top_p_are_argmax():
    lg = _logits()
    b = lg.shape[0]
    argmax = lg.argmax(-1)
    ones, zeros = torch.ones(b), torch.zeros(b)
    assert torch.equal(sample(lg, zeros, torch.zeros(b, dtype=torch.long), ones), argmax)
    assert torch.equal(sample(lg, ones, torch.ones(b, dtype=torch.long), ones), argmax)
    assert torch.equal(sample(lg, ones, torch.zeros(b, dtype=torch.long), torch.full((b,), 1e-6)), argmax)


def test_top_k_and_top_p_restrict_support():
    lg = _logits(1, 20, seed=1).expand(2000, 20).contiguous()
    n = lg.shape[0]
    top3 = set(lg[0].topk(3).indices.tolist())
    got = sample(lg, torch.ones(n), torch.full((n,), 3), torch.ones(n))
    assert set(got.tolist()) == top3
    probs = torch.softmax(lg[0], -1)
    order = probs.argsort(descending=True)
    keep = int((probs[order].cumsum(0) < 0.6).sum()) + 1  # smallest prefix reaching 0.6
    got = sample(lg, torch.ones(n), torch.zeros(n, dtype=torch.long), torch.full((n,), 0.6))
    assert set(got.tolist()) == set(order[:keep].tolist())


def test_sampling_follows_the_distribution():
    lg = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3).contiguous()
    n = lg.shape[0]
    got = sample(lg, torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n))
    freq = torch.bincount(got, minlength=3).float() / n
    expect = torch.softmax(lg[0], -1)
    print("freq", freq, "expected", expect)
    torch.testing.assert_close(freq, expect, atol=0.02, rtol=0)


def test_seeded_rows_are_reproducible_regardless_of_batch():
    lg = _logits(3, 100, seed=2)
    params = SamplingParams(temperature=1.0, seed=7)
    dec = lambda: SequenceDecoder(None, params)
    a = [int(pick_tokens(lg[:1], [dec()])[0]) for _ in range(3)]
    others = [SequenceDecoder(None, SamplingParams(temperature=1.0)) for _ in range(2)]
    b = int(pick_tokens(lg, [dec()] + others)[0])
    assert a == [a[0]] * 3 and b == a[0]


def test_penalties_push_repeated_tokens_down():
    lg = torch.zeros(1, 5)
    lg[0, 2] = 1.0
    d = SequenceDecoder(None, SamplingParams(temperature=0, frequency_penalty=0.6))
    d.token_ids = [2, 2]
    assert int(pick_tokens(lg, [d])[0]) != 2
    d2 = SequenceDecoder(None, SamplingParams(temperature=0, presence_penalty=0.5))
    d2.token_ids = [2]
    assert int(pick_tokens(lg, [d2])[0]) == 2  # 1 - 0.5 still beats 0


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("max_tokens", 0),
                                         ("presence_penalty", 3), ("stop", ("",))])
def test_bad_sampling_params_are_typed_errors(field, value):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_stop_matcher_holds_back_and_cuts():
    m = StopMatcher(("STOP", "\n\n"))
    out = [m.feed(x) for x in ["ab", "cS", "TO", "x"]]
    assert "".join(out) == "abcSTOx" and not m.stopped and m.flush() == ""
    m = StopMatcher(("STOP",))
    assert m.feed("hello ST") == "hello " and m.feed("OP and more") == "" and m.stopped
    m = StopMatcher(("STOP",))
    assert m.feed("x ST") == "x " and m.flush() == "ST"


def test_incremental_detokenizer_reassembles_text(tokenizer_factory):
    tok = tokenizer_factory()
    text = "a red circle at top left, naïve ünïcode ✓ and a blue square"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    det = IncrementalDetokenizer(tok)
    deltas = [det.push(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_generate_stops_on_length_and_on_stop_strings(tiny_vlm, images):
    model, proc = tiny_vlm
    g = generate(model, proc, MSGS, images=images[:1], params=SamplingParams(temperature=0, max_tokens=6,
                                                                             ignore_eos=True))
    assert g.finish_reason == "length" and len(g.token_ids) == 6
    assert g.prompt_tokens == len(proc.encode_messages(MSGS, images[:1]).input_ids)
    assert proc.image_token_id not in g.token_ids
    # Same seed, same sample.
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    assert generate(model, proc, MSGS, images=images[:1], params=p).token_ids == \
        generate(model, proc, MSGS, images=images[:1], params=p).token_ids


def test_sequence_decoder_finishes_on_stop_string_eos_and_length(tokenizer_factory):
    tok = tokenizer_factory()
    ids = tok("a red circle STOP at top", add_special_tokens=False)["input_ids"]
    d = SequenceDecoder(tok, SamplingParams(stop=(" STOP",), max_tokens=50), eos_ids=(tok.eos_token_id,))
    out = ""
    for i in ids:
        out += d.accept(i)
        if d.finished:
            break
    assert out == "a red circle" and d.finish_reason == "stop"
    d = SequenceDecoder(tok, SamplingParams(max_tokens=50), eos_ids=(tok.eos_token_id,))
    out = "".join(d.accept(i) for i in ids[:2]) + d.accept(tok.eos_token_id)
    assert d.finish_reason == "stop" and out == tok.decode(ids[:2])
    d = SequenceDecoder(tok, SamplingParams(max_tokens=2, stop=("zzz",)))
    out = "".join(d.accept(i) for i in ids[:2])
    assert d.finish_reason == "length" and out == tok.decode(ids[:2])
    d = SequenceDecoder(tok, SamplingParams(max_tokens=5, ignore_eos=True), eos_ids=(tok.eos_token_id,))
    d.accept(tok.eos_token_id)
    assert not d.finished


def test_to_device_builds_the_tensor_torch_tensor_would():
    """The engine's host-to-device helper gives the same values and dtypes as torch.tensor, and
    passes a tensor already on the target device through."""
    from model.generate import to_device

    t = to_device([3, 1, 2], "cpu", torch.long)
    assert t.dtype == torch.long and t.tolist() == [3, 1, 2] and t.device.type == "cpu"
    f = to_device((0.5, 0.0), torch.device("cpu"), torch.float32)
    assert f.dtype == torch.float32 and f.tolist() == [0.5, 0.0]
    x = torch.arange(4)
    assert torch.equal(to_device(x, "cpu"), x)
    if torch.cuda.is_available():
        g = to_device([7, 8], "cuda", torch.long)
        assert g.is_cuda and g.tolist() == [7, 8]
        assert to_device(g, "cuda") is g

