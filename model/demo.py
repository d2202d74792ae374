"""Where the bundled demo checkpoint lives (trained by ``vlmamba train --recipe demo``)."""

from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "shapes-demo"
