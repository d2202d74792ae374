"""Prefill and image-encoder graphs: buckets, the padded prefill they replay (on the CPU), and
the captured graphs against eager runs (on a GPU)."""

import pytest
import torch

from model import MambaConfig
from model.graphs import PREFILL_LENGTHS, GraphEncoder, GraphPrefill, prefill_shapes
from model.mamba import MambaLM

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_prefill_buckets_cover_short_batches_and_pick_the_fewest_padded_tokens():
    shapes = prefill_shapes(8, 2048)
    assert all(b * l <= 2048 for b, l in shapes) and (1, 2048) in shapes and (8, 256) in shapes
    assert (8, 384) not in shapes and {b for b, _ in shapes} == {1, 2, 4, 8}
    lm = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=50, d_state=4))
    gp = GraphPrefill(lm, lm.allocate_state(3), 2, max_batch=8, max_tokens=2048, use_graphs=False)
    assert gp.bucket(1, 17) == (1, 32) and gp.bucket(3, 100) == (4, 128) and gp.bucket(1, 769) == (1, 896)
    assert gp.bucket(5, 256) == (8, 256) and gp.bucket(5, 257) is None and gp.bucket(1, 2049) is None
    assert PREFILL_LENGTHS == tuple(sorted(PREFILL_LENGTHS)) and all(l % 16 == 0 for l in PREFILL_LENGTHS)


def _lm(device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        return MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=300, d_state=8), dtype=dtype).init_weights(0)


def _check_padded_prefill(lm, use_graphs: bool, atol: float):
    """Two batches through one GraphPrefill (the second one row short of the first's bucket, so
    the first's last row, a live slot, sits stale in the buffers) give the logits and slot states
    of unpadded eager prefills, and touch no slot but theirs and the scratch row."""
    device = lm.backbone.embedding.weight.device
    state, ref_state = lm.allocate_state(6), lm.allocate_state(6)
    for s in (state, ref_state):
        s.ssm.normal_()
        s.conv.normal_()
    ref_state.ssm.copy_(state.ssm)
    ref_state.conv.copy_(state.conv)
    gp = GraphPrefill(lm, state, scratch_slot=5, max_batch=4, max_tokens=256, use_graphs=use_graphs)
    if use_graphs:
        gp.capture()
    ids = torch.randint(1, 300, (4, 40), device=device)
    with torch.inference_mode():
        for rows, lengths, slots in (([0, 1, 2, 3], [40, 23, 31, 12], [3, 0, 1, 4]), ([1, 3, 2], [9, 5, 14], [2, 3, 0]),
                                     ([0], [17], [1])):
            x, lens = ids[rows][:, : max(lengths)], torch.tensor(lengths, device=device)
            sl = torch.tensor(slots, device=device)
            assert gp.bucket(len(rows), x.shape[1]) is not None
            got = gp.run(lm.backbone.embedding(x), sl, lens).float()
            want = lm(x, state=ref_state, slots=sl, lengths=lens, last_only=True).float()
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= atol * scale, (rows, (got - want).abs().max().item(), scale)
    for slot in range(5):  # every owned slot matches
        assert torch.allclose(state.ssm[:, slot].float(), ref_state.ssm[:, slot].float(), atol=atol, rtol=atol)
        assert torch.allclose(state.conv[:, slot].float(), ref_state.conv[:, slot].float(), atol=atol, rtol=atol)
    return gp


def test_padded_prefill_matches_unpadded_prefill_on_cpu():
    _check_padded_prefill(_lm("cpu", torch.float32), use_graphs=False, atol=1e-4)


def test_prefill_outside_every_bucket_runs_eagerly_unpadded():
    lm = _lm("cpu", torch.float32)
    state = lm.allocate_state(3)
    gp = GraphPrefill(lm, state, scratch_slot=2, max_batch=1, max_tokens=32, use_graphs=False)
    ids = torch.randint(1, 300, (2, 40))
    with torch.inference_mode():
        got = gp.run(lm.backbone.embedding(ids), torch.tensor([0, 1]), None)
        want = lm(ids, state=lm.allocate_state(3), slots=torch.tensor([0, 1]), last_only=True)
    assert gp.bucket(2, 40) is None and torch.allclose(got, want, atol=1e-5)


@needs_cuda
def test_prefill_graphs_replay_the_eager_prefill():
    gp = _check_padded_prefill(_lm("cuda", torch.bfloat16), use_graphs=True, atol=2e-2)
    assert len(gp.graphs) == len(gp.shapes) > 0


@needs_cuda
def test_encoder_graphs_replay_the_eager_encoder(tiny_vlm, images):
    model, proc = tiny_vlm
    model = model.to("cuda")
    pix = proc.preprocess_images(images[:3]).to("cuda")
    with torch.inference_mode():
        enc = GraphEncoder(model.encode_images, tuple(pix.shape[1:]), pix.dtype, "cuda", max_images=2).capture()
        assert enc.buckets == [1, 2]
        for batch in (pix[:1], pix[1:3], pix):  # a bucket, another bucket, more than the largest (eager)
            got, want = enc.run(batch).clone(), model.encode_images(batch)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    model.to("cpu")


@needs_cuda
def test_decode_graphs_mask_the_logits_and_take_their_argmax():
    """Given a vocabulary mask, the decode graphs (and the eager step past the largest bucket)
    return the step's logits with the masked ids at -inf, and ``argmax`` is the argmax of those:
    with half the vocabulary masked, it never picks a masked id."""
    from model.graphs import GraphDecoder

    lm = _lm("cuda", torch.bfloat16)
    state, ref_state = lm.allocate_state(7), lm.allocate_state(7)
    mask = torch.zeros(lm.config.padded_vocab_size, dtype=torch.bool, device="cuda")
    mask[::2] = True
    graphs = GraphDecoder(lm, state, scratch_slot=6, max_batch=4, mask=mask).capture()
    with torch.inference_mode():
        for b in (3, 1, 5):  # 5 rows fit no bucket: the eager step
            ids = torch.randint(1, 300, (b,), device="cuda")
            slots = torch.randperm(6, device="cuda")[:b]
            got = graphs.step(ids, slots).float()
            want = lm.step(ids, state=ref_state, slots=slots).float()
            assert torch.isinf(got[:, mask]).all() and (got[:, mask] < 0).all()
            assert (got[:, ~mask] - want[:, ~mask]).abs().max().item() <= 2e-2 * want.abs().max().item()
            assert torch.equal(graphs.argmax, got.argmax(-1)) and not mask[graphs.argmax].any()
    assert graphs.bucket(5) is None and graphs.bucket(3) == 4


@needs_cuda
def test_decode_graphs_feed_their_argmax_back_and_copy_only_changed_inputs():
    """The graphs write their argmax into the other of two id buffers, so feeding ``argmax``
    back skips the copy, and slots fed again under the same host key skip theirs. Every step
    still equals the eager step on the inputs really given: the argmax fed back, slots under a
    new key, slots changed in place without a key, ids that are another view of the graphs'
    buffers. ``copy_out`` of each step, read a step later, holds that step's argmax."""
    from model.graphs import GraphDecoder

    lm = _lm("cuda", torch.float32)
    state, ref_state = lm.allocate_state(7), lm.allocate_state(7)
    graphs = GraphDecoder(lm, state, scratch_slot=6, max_batch=4).capture()
    key = (4, 1)
    slots = torch.tensor(key, device="cuda")
    tok = torch.tensor([5, 9], device="cuda")
    pinned = [torch.empty(2, dtype=torch.long, pin_memory=True) for _ in range(2)]
    pending = None
    with torch.inference_mode():
        for t in range(9):
            if t == 3:
                key = (2, 5)
                slots = torch.tensor(key, device="cuda")
            if t == 5:
                key = None
                slots.copy_(torch.tensor([0, 3]))  # in place, no key: copied again
            if t == 7:
                tok = graphs.ids.view(-1)[1:3]  # shares the id buffers, one row off
            fed = tok.clone()
            got = graphs.step(tok, slots, slots_key=key).float().clone()
            want = lm.step(fed, state=ref_state, slots=slots).float()
            assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), t
            assert torch.equal(graphs.argmax, got.argmax(-1)), t
            done = graphs.copy_out(pinned[t % 2])
            if pending is not None:  # the previous step's copy, read while this step may still run
                pending[0].synchronize()
                assert torch.equal(pending[1], pending[2]), t
            pending = (done, pinned[t % 2], graphs.argmax.cpu())
            tok = graphs.argmax
        # The live slots (not the scratch row, 6) hold the states of the steps as given.
        assert (state.ssm[:, :6] - ref_state.ssm[:, :6]).abs().max().item() <= 1e-4
