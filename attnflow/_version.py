"""The one place attnflow's version is written (pyproject.toml reads it; every file attnflow writes records it)."""

__version__ = "0.2.0"
