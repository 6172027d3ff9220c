from backend.storage.streams.base import StreamExpired, StreamFull, StreamLog, StreamSlice
from backend.storage.streams.memory import MemoryStreamLog

__all__ = ["MemoryStreamLog", "StreamExpired", "StreamFull", "StreamLog", "StreamSlice"]
