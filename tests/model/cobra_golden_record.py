"""Records what timm computes for the tiny Cobra towers: ``data/cobra_timm_golden.safetensors``.

Runs where timm and torchvision import (the test machines have neither; the tests compare our
vision path with these recordings). It builds each featurizer the way Cobra's vision backbones
do (cobra/models/backbones/vision/base_vision.py, dinosiglip_vit.py): ``timm.create_model(name,
pretrained=True, num_classes=0, img_size=384)`` from a local weights file (timm resamples the
position embedding on load), features = ``get_intermediate_layers(n={len(blocks) - 2})``, and
the image transforms of each ``image_resize_strategy``.

    python3 -m tests.model.cobra_golden_record OUT.safetensors
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision
import torchvision.transforms.functional as TVF
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import Compose, Resize

from tests.model.cobra_tiny import (IMAGE_SIZE, STRATEGIES, TOWERS, TRANSFORM_SIZE, probe_images, probe_pixels,
                                    tiny_weights)


def featurizer(tower: str, weights_file: Path):
    spec = TOWERS[tower]
    model = timm.create_model(f"{spec['arch']}.{spec['tag']}", pretrained=True, num_classes=0, img_size=IMAGE_SIZE,
                              pretrained_cfg_overlay={"file": str(weights_file)}, **spec["model_args"])
    return model.eval()


def cobra_transform(model, tower: str, strategy: str, size: int):
    """The image transform Cobra builds for one featurizer (data config resized to ``size``)."""
    data_cfg = timm.data.resolve_model_data_config(model)
    data_cfg["input_size"] = (3, size, size)
    default = timm.data.create_transform(**data_cfg, is_training=False)
    if tower == "siglip":  # Cobra's fix: SigLIP's default resize is larger than its crop
        default = Compose([Resize(size, interpolation=default.transforms[0].interpolation), *default.transforms[1:]])
    if strategy == "resize-naive":
        return Compose([Resize((size, size), interpolation=default.transforms[0].interpolation),
                        *default.transforms[1:]]), data_cfg
    if strategy == "resize-crop":
        return default, data_cfg
    fill = tuple(int(x * 255) for x in data_cfg["mean"])

    def letterbox(image):
        (w, h), m = image.size, max(image.size)
        hp, vp = int((m - w) / 2), int((m - h) / 2)
        return TVF.pad(image, [hp, vp, hp, vp], fill=fill, padding_mode="constant")

    return Compose([letterbox, *default.transforms]), data_cfg


@torch.no_grad()
def record() -> tuple[dict[str, torch.Tensor], dict]:
    out, meta = {}, {"timm": timm.__version__, "torchvision": torchvision.__version__, "torch": torch.__version__,
                     "shapes": {}, "data_cfg": {}, "depth": {}}
    x = probe_pixels(1)
    images = [Image.fromarray(np.asarray(im)) for im in probe_images()]
    with tempfile.TemporaryDirectory() as tmp:
        for tower, spec in TOWERS.items():
            at_file_size = timm.create_model(f"{spec['arch']}.{spec['tag']}", pretrained=False, num_classes=0,
                                             img_size=spec["file_img_size"], **spec["model_args"])
            shapes = {k: list(v.shape) for k, v in at_file_size.state_dict().items()}
            path = Path(tmp) / f"{tower}.safetensors"
            save_file(tiny_weights(shapes), str(path))
            model = featurizer(tower, path)
            feats = model.get_intermediate_layers(x, n={len(model.blocks) - 2})[0]
            out[f"features.{tower}"] = feats.contiguous()
            meta["shapes"][tower], meta["depth"][tower] = shapes, len(model.blocks)
            for strategy in STRATEGIES:
                transform, data_cfg = cobra_transform(model, tower, strategy, TRANSFORM_SIZE)
                for i, im in enumerate(images):
                    out[f"pixels.{tower}.{strategy}.{i}"] = transform(im).contiguous()
            meta["data_cfg"][tower] = {k: data_cfg[k] for k in ("mean", "std", "interpolation", "crop_pct")}
    return out, meta


def main(argv: list[str]) -> int:
    tensors, meta = record()
    save_file(tensors, argv[0], metadata={"golden": json.dumps(meta)})
    print(json.dumps({k: meta[k] for k in ("timm", "torchvision", "torch", "depth", "data_cfg")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
