"""Real servers for the tests and the benchmarks alike: a tokenwire process on a free port
(`server`), a redis-server (`redis_server`), and streams cut at random (`chaos`).

Both `tests/` and `bench/` import from here; neither imports from the other's tree."""
