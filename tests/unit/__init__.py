"""Unit tests: pure cores and single parts, mirroring the code tree."""
