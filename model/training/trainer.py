"""The two-stage trainer of VL-Mamba (paper: stage 1 connector only, stage 2 connector + LM).

Single process or DDP under ``torchrun`` (gloo on CPU, NCCL on GPU). Deterministic data order
(a seeded permutation per epoch), so ``resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from model.training.data import IGNORE, collate

log = logging.getLogger(__name__)
STAGES = ("pretrain", "finetune")


@dataclass
class TrainConfig:
    out: str
    stage: str = "finetune"
    train_vision: bool = False
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0
    save_every: int = 0
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    device: str = "cpu"
    bf16: bool = True
    resume: bool = False

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")


def set_trainable(model, stage: str, train_vision: bool) -> list[str]:
    """pretrain: connector only; finetune: connector + LM; the vision tower only on request.
    Vision layers past the feature layer never receive gradients and stay frozen. Returns trainable names."""
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    if stage == "finetune":
        model.llm.requires_grad_(True)
    if train_vision:
        model.vision_tower.requires_grad_(True)
        for name, p in model.vision_tower.named_parameters():
            if _past_feature_layer(name, model.config.vision):
                p.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _past_feature_layer(name: str, vcfg) -> bool:
    n_layers = vcfg.hf_config.get("num_hidden_layers", 12)
    used = n_layers + 1 + vcfg.feature_layer if vcfg.feature_layer < 0 else vcfg.feature_layer
    if "post_layernorm" in name or name.startswith("model.head."):
        return True
    if ".layers." in name:
        return int(name.split(".layers.")[1].split(".")[0]) >= used
    return False


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, sharded by rank, able to start mid-epoch."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        per_rank = self.n // self.world
        return iter(perm[self.rank * per_rank:(self.rank + 1) * per_rank][self.start:])

    def __len__(self) -> int:
        return self.n // self.world - self.start


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def lm_loss(model, batch: dict, device) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (assistant) tokens."""
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    pix = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
    logits = model(ids, pix)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def train(model, processor, dataset, cfg: TrainConfig) -> list[float]:
    """Train in place; writes checkpoints under ``cfg.out`` and the final model to ``cfg.out``.
    Returns the loss of every optimizer step (this rank's)."""
    rank, world = _dist()
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model.to(device).train()
    names = set(set_trainable(model, cfg.stage, cfg.train_vision))
    params = [p for n, p in model.named_parameters() if n in names]
    wrapped = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    step = _maybe_resume(cfg, model, opt, device) if cfg.resume else 0
    sampler = EpochSampler(len(dataset), cfg.seed, rank, world)
    pad = processor.tokenizer.pad_token_id or 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.num_workers, collate_fn=lambda b: collate(b, pad))
    per_epoch = max(1, (len(dataset) // world) // cfg.batch_size)
    losses = _loop(wrapped, model, processor, opt, loader, sampler, per_epoch, step, cfg, device, rank)
    if rank == 0:
        model.save_pretrained(cfg.out, processor)
    if world > 1:
        dist.barrier()
    return losses


def _batches(loader, sampler, per_epoch: int, micro: int, batch_size: int):
    """Endless micro-batches starting at micro-batch number ``micro`` of the whole run."""
    sampler.epoch, skip = divmod(micro, per_epoch)
    sampler.start = skip * batch_size
    while True:
        yield from loader
        sampler.epoch, sampler.start = sampler.epoch + 1, 0


def _loop(wrapped, model, processor, opt, loader, sampler, per_epoch, step, cfg, device, rank) -> list[float]:
    amp = device.type == "cuda" and cfg.bf16
    batches = _batches(loader, sampler, per_epoch, step * cfg.grad_accum, cfg.batch_size)
    losses: list[float] = []
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, desc=f"train {cfg.stage}", dynamic_ncols=True)
    while step < cfg.max_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        total = 0.0
        for _ in range(cfg.grad_accum):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = lm_loss(wrapped, next(batches), device) / cfg.grad_accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(total)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr_at(step - 1, cfg):.2e}")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps and rank == 0:
            _save(cfg, model, processor, opt, step)
    bar.close()
    return losses


def _save(cfg: TrainConfig, model, processor, opt, step: int) -> Path:
    d = Path(cfg.out) / f"checkpoint-{step:07d}"
    model.save_pretrained(d, processor)
    torch.save({"step": step, "optimizer": opt.state_dict(), "config": asdict(cfg)}, d / "trainer_state.pt")
    log.info("saved %s", d)
    return d


def latest_checkpoint(out: str | Path) -> Path | None:
    found = sorted(Path(out).glob("checkpoint-*/trainer_state.pt"))
    return found[-1].parent if found else None


def _maybe_resume(cfg: TrainConfig, model, opt, device) -> int:
    from model.checkpoint import load_state_dict

    d = latest_checkpoint(cfg.out)
    if d is None:
        log.info("no checkpoint under %s; starting at step 0", cfg.out)
        return 0
    sd = load_state_dict(d)
    model.load_state_dict(sd, strict=False)
    state = torch.load(d / "trainer_state.pt", map_location=device, weights_only=True)
    opt.load_state_dict(state["optimizer"])
    log.info("resumed from %s at step %d", d, state["step"])
    return state["step"]
