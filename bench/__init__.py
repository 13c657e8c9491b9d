"""Benchmarks that print comparable figures side by side: ``persona bench ...``."""
