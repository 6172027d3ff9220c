"""Helpers only the tests use: the log guard, fault injection, fakes and clients."""
