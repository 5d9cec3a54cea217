"""Mechanistic-interpretability claims about CODI continuous-thought models, as a pytest suite."""

__version__ = "0.1.0"
