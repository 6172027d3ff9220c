"""What tokenwire keeps, each part a contract (`base.py`) with one backend per process kind:
in memory or SQLite for one process, Redis for many processes acting as one.

- `broker`: live events per user and per node (publish, subscribe);
- `streams`: each answer's stream log, for resume and replay;
- `history`: conversations and their messages;
- `leases`: which node runs a generation;
- `request_ids`: the first `chat` with an id starts a generation, repeats replay it;
- `ratelimit`: token buckets for chats, connections and each user's token quota.

All Redis connection code is in `redis_connection` (URL check, pools, key tags, the reply
reader) and `redis_pipeline` (automatic pipelining). See docs/ARCHITECTURE.md.
"""
