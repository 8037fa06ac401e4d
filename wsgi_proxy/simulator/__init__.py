"""A fake OpenAI Responses API upstream with fault injection, for tests, benchmarks and demos."""

from __future__ import annotations

from .config import SimulatorConfig as SimulatorConfig
from .server import Simulator as Simulator
from .server import serve as serve

__all__ = ["Simulator", "SimulatorConfig", "serve"]
