"""Python client of vlmamba-serve, the OpenAI-compatible VL-Mamba vision-language server.

    from vlmamba_client import Client
    with Client("http://127.0.0.1:8000") as client:
        print(client.chat(prompt="What is in the picture?", images=["cat.png"], temperature=0).text)

Depends only on httpx and pydantic; Pillow is optional (for passing PIL images).
"""

from vlmamba_client._base import ChatParams, RetryPolicy
from vlmamba_client.async_client import AsyncChatStream, AsyncClient, AsyncSession
from vlmamba_client.client import ChatStream, Client, Session
from vlmamba_client.errors import (APIConnectionError, APIError, APITimeoutError, AuthenticationError,
                                   BadRequestError, RateLimitError, RequestTooLargeError, ServerError)
from vlmamba_client.images import to_image_url
from vlmamba_client.metrics import Metrics, parse_metrics
from vlmamba_client.types import ChatChunk, ChatResponse, Health, ModelInfo, Usage

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError", "APIError", "APITimeoutError", "AsyncChatStream", "AsyncClient", "AsyncSession",
    "AuthenticationError", "BadRequestError", "ChatChunk", "ChatParams", "ChatResponse", "ChatStream", "Client",
    "Health", "Metrics", "ModelInfo", "RateLimitError", "RequestTooLargeError", "RetryPolicy", "ServerError",
    "Session", "Usage", "parse_metrics", "to_image_url",
]
