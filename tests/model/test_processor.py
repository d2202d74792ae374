"""Image preprocessing in two halves: uint8 pixels on the host, rescaling and normalizing on any
device, which must give what the transformers image processor gives in one go."""

import pytest
import torch
from PIL import Image

from model.config import VisionConfig
from model.processor import VLMambaProcessor
from model.vision import image_processor_for


def _processor(kind: str, size: int) -> VLMambaProcessor:
    proc = VLMambaProcessor.__new__(VLMambaProcessor)  # the image half only: no tokenizer needed
    proc.image_processor = image_processor_for(VisionConfig(kind, {"image_size": size}))
    return proc


def _images():
    grad = Image.linear_gradient("L").resize((500, 300)).convert("RGB")  # smooth: resampling leaves fractions
    return [grad, Image.new("RGBA", (40, 30), (30, 120, 200, 90)), Image.effect_noise((97, 211), 60).convert("L")]


@pytest.mark.parametrize("kind,size", [("siglip", 384), ("siglip", 64), ("clip", 336)])
def test_uint8_pixels_normalized_later_equal_the_processors_pixels(kind, size):
    proc, images = _processor(kind, size), _images()  # (the noise image differs from call to call)
    full = proc.preprocess_images(images)
    raw = proc.preprocess_images(images, normalize=False)
    assert full.dtype == torch.float32 and raw.dtype == torch.uint8 and raw.shape == full.shape == (3, 3, size, size)
    assert raw.numel() * raw.element_size() * 4 == full.numel() * full.element_size()
    torch.testing.assert_close(proc.normalize_pixels(raw), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(proc.normalize_pixels(raw[1]), full[1], atol=1e-6, rtol=0)  # one image, (3, H, W)
    assert proc.preprocess_images([], normalize=False) is None


def test_a_processor_without_whole_pixels_gives_normalized_floats():
    """Pixels that are not whole numbers (here: a processor whose output is shifted by half a
    level) cannot go through uint8: preprocess_images(normalize=False) then gives the normalized
    pixels."""
    proc = _processor("siglip", 64)
    real = proc.image_processor.__class__.__call__

    def fractional(self, images, **kw):
        out = real(self, images, **kw)
        out["pixel_values"] = out["pixel_values"].float() + 0.5
        return out

    proc.image_processor.__class__ = type("Fractional", (proc.image_processor.__class__,), {"__call__": fractional})
    px = proc.preprocess_images(_images()[:1], normalize=False)
    assert px.dtype == torch.float32 and px.min() < 0  # normalized: SigLIP's pixels lie in [-1, 1]


PEAK_PROBE = """
import resource, sys
from PIL import Image
from model.demo import DEMO_CHECKPOINT
from model.checkpoint_vlm import load_vlmamba
_, proc = load_vlmamba(DEMO_CHECKPOINT)
images = [Image.new("RGB", (6000, 6000), (10 * i, 200, 30)) for i in range(4)]  # 108 MB each
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
proc.preprocess_images(images, normalize=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_requests_large_images_are_preprocessed_one_at_a_time():
    # The image processor's copies of a full-size image (numpy arrays, converted copies) live for
    # one image at a time: four 36-megapixel images at once grew the peak by ~1.1 GB, one at a
    # time by ~0.35 GB (the images themselves are already held before).
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", PEAK_PROBE], cwd=Path(__file__).parents[2], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 600  # MB of peak growth
