"""Developer tools: the local servers the stack, the tests and the benchmarks start (not runtime code)."""
