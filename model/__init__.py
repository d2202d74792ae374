"""VL-Mamba: ViT vision tower -> MultiModal Connector -> Mamba-1 language model."""

from model.config import ConnectorConfig, MambaConfig, VisionConfig, VLMambaConfig
from model.mamba import MambaLM
from model.state import InferenceState

__all__ = ["ConnectorConfig", "InferenceState", "MambaConfig", "MambaLM", "VLMambaConfig", "VisionConfig"]
