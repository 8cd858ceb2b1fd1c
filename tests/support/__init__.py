"""Helpers shared by test modules and the benchmarks (never test modules importing each other)."""
