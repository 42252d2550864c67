"""Helpers for tests, benchmarks and the demo: never imported by the library itself."""
