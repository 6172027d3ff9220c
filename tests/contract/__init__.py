"""Contract suites: each storage part's contract, run over every backend."""
