"""The bundled job catalog: real io and cpu work, and the stock aggregators."""

from . import aggregate, cpu, io

__all__ = ["aggregate", "cpu", "io"]
