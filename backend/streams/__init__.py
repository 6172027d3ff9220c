from backend.streams.base import StreamExpired, StreamFull, StreamLog, StreamSlice
from backend.streams.memory import MemoryStreamLog

__all__ = ["MemoryStreamLog", "StreamExpired", "StreamFull", "StreamLog", "StreamSlice"]
