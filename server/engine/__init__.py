"""The serving engine: continuous batching over a fixed pool of recurrent-state slots, run in a
thread (:class:`Engine`) or in a process of its own (:class:`EngineProcess`, the same calls).

Never imports FastAPI: ``server/`` translates HTTP to :class:`Engine` calls and back.
"""

from server.engine.engine import Engine, EngineConfig
from server.engine.process import EngineProcess, EngineStartError
from server.engine.types import EngineOutput, EngineRequest, EngineStats, ImageInput

__all__ = ["Engine", "EngineConfig", "EngineOutput", "EngineProcess", "EngineRequest", "EngineStartError",
           "EngineStats", "ImageInput"]
