"""Sources of answer tokens: the contract and its implementations."""

from backend.providers.base import Finish, Provider, ProviderError
from backend.providers.clock import ClockProvider, clock_token
from backend.providers.demo import DEFAULT_PARAGRAPHS, DemoProvider, demo_reply, demo_tokens
from backend.providers.openai import OpenAIProvider

__all__ = [
    "DEFAULT_PARAGRAPHS",
    "ClockProvider",
    "DemoProvider",
    "Finish",
    "OpenAIProvider",
    "Provider",
    "ProviderError",
    "clock_token",
    "demo_reply",
    "demo_tokens",
]
