"""Run by torchrun in tests: a few DDP steps on the CPU (gloo), then each rank reports a weight digest."""

import hashlib
import sys

import torch

from model import MambaConfig
from model.factory import create_vlmamba, tiny_vision_config
from model.tokenizer import train_bpe_tokenizer
from model.training.data import ShapesDataset
from model.training.recipes import shapes_texts
from model.training.trainer import TrainConfig, train

out = sys.argv[1]
torch.set_num_threads(1)
tok = train_bpe_tokenizer(shapes_texts(100), vocab_size=300)
model, proc = create_vlmamba(tiny_vision_config("siglip"), MambaConfig(d_model=32, n_layer=2, vocab_size=300, d_state=8),
                             tok, "vss_l2", "bsm", seed=0)
ds = torch.utils.data.Subset(ShapesDataset(proc, "train", 8), list(range(8)) * 8)
cfg = TrainConfig(out=f"{out}/out", max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2)
losses = train(model, proc, ds, cfg)
rank = torch.distributed.get_rank()
digest = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in model.state_dict().values())).hexdigest()
first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
with open(f"{out}/rank{rank}.txt", "w") as f:
    f.write(f"{digest} {first} {last}\n")
torch.distributed.destroy_process_group()
