"""The serving engine: continuous batching over a fixed pool of recurrent-state slots.

Never imports FastAPI: ``server/`` translates HTTP to :class:`Engine` calls and back.
"""

from server.engine.engine import Engine, EngineConfig
from server.engine.types import EngineOutput, EngineRequest, ImageInput

__all__ = ["Engine", "EngineConfig", "EngineOutput", "EngineRequest", "ImageInput"]
