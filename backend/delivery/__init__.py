"""From a generation's events to one client's socket: coalescing and backpressure.

- `outbox`: one connection's outgoing frames, bounded and exact per stream (no I/O);
- `feed`: `Delivery` fills an outbox from the broker and the stream log, for any transport;
- `hub`: the live clients of the process, their sweeps and their shutdown;
- `flush`: when a sender wakes, at once while quiet, on one shared tick under load;
- `lean_event`: a small `asyncio.Event` for the many per connection.
"""
