import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from model.data.shapes import export_llava
from model.training.data import IGNORE, LlavaDataset, ShapesDataset
from model.training.trainer import TrainConfig, lr_at, set_trainable, train


def _cfg(out, **kw):
    return TrainConfig(out=str(out), **{"max_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, **kw})


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_llava_dataset_labels_only_assistant_turns(fresh_vlm, tmp_path):
    _, proc = fresh_vlm
    path = export_llava("train", 3, tmp_path, seed=0)
    ds = LlavaDataset(path, None, proc)
    ex = ds[0]
    answers = [t["value"] for t in ds.records[0]["conversations"] if t["from"] == "gpt"]
    labelled = [t for t in ex.labels if t != IGNORE]
    expect = "".join(a + proc.tokenizer.eos_token + "\n" for a in answers)
    assert proc.tokenizer.decode(labelled) == expect
    assert ex.input_ids.count(proc.image_token_id) == proc.num_image_tokens and ex.pixel_values.shape[0] == 1
    # Labels sit exactly on the answer tokens of the full conversation.
    full = [t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE]
    assert full == labelled


def test_loss_decreases_on_a_small_subset(fresh_vlm, tmp_path):
    model, proc = fresh_vlm
    ds = torch.utils.data.Subset(ShapesDataset(proc, "train", 8), list(range(8)) * 4)
    losses = train(model, proc, ds, _cfg(tmp_path, max_steps=40, batch_size=8, warmup_steps=5))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()


def test_pretrain_changes_only_the_connector(fresh_vlm, tmp_path):
    model, proc = fresh_vlm
    before = _snapshot(model)
    train(model, proc, ShapesDataset(proc, "train", 8), _cfg(tmp_path, stage="pretrain", max_steps=2))
    after = _snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("connector.") for k in changed), sorted(changed)[:5]
    assert {k for k in before if k.startswith("connector.")} - changed <= {k for k in before if "A_log" in k}


def test_finetune_and_vision_flags_choose_trainable_parts(fresh_vlm):
    model, _ = fresh_vlm
    names = set_trainable(model, "finetune", train_vision=False)
    assert any(n.startswith("llm.") for n in names) and not any(n.startswith("vision_tower.") for n in names)
    names = set_trainable(model, "finetune", train_vision=True)
    vis = [n for n in names if n.startswith("vision_tower.")]
    # Layer 0 of 2 feeds the penultimate features; the last layer and post-norm get no gradient.
    assert any(".layers.0." in n for n in vis) and not any(".layers.1." in n or "post_layernorm" in n for n in vis)


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(out="x", max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(55, cfg) - 0.55) < 1e-9 and abs(lr_at(100, cfg) - 0.1) < 1e-9


def test_resume_continues_at_the_same_step(fresh_vlm, shapes_tokenizer, tmp_path):
    import copy

    model, proc = fresh_vlm
    init = _snapshot(model)
    ds = ShapesDataset(proc, "train", 40)
    full = train(model, proc, ds, _cfg(tmp_path / "a", save_every=2, max_steps=4, batch_size=4))
    ref = _snapshot(model)
    # A second run whose first two steps "happened before the crash": it holds only checkpoint 2.
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-0000002", tmp_path / "b" / "checkpoint-0000002")
    model.load_state_dict(init)
    rest = train(model, proc, ds, _cfg(tmp_path / "b", save_every=2, max_steps=4, batch_size=4, resume=True))
    assert len(full) == 4 and len(rest) == 2
    assert rest == full[2:]
    got = _snapshot(model)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert r0[0] == r1[0], "ranks hold different weights"
    assert float(r0[2]) < float(r0[1]) and float(r1[2]) < float(r1[1])  # loss went down on each rank
    assert (tmp_path / "out" / "model.safetensors").exists()
