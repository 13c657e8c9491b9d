"""Serving and the ``persona`` command line."""
