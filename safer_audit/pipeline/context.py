"""What every stage of a run is handed: the configuration, the executor, progress and the stage clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..common.progress import no_progress
from ..config import ScanConfig


@dataclass
class RunContext:
    """One run's surroundings. ``steps`` is a progress factory (common.progress); ``executor`` the engine's
    executor, chosen once here from ``config.activations.engine`` and handed to every stage that computes
    activations or codes; ``timings`` gets each stage's seconds, in the order the stages ran."""

    config: ScanConfig
    steps: Callable = no_progress
    warn: Callable[[str], None] | None = None
    executor: object = None
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, config: ScanConfig, *, steps=no_progress, warn=None, timings=None) -> RunContext:
        from ..model.activations import executor_for  # here: the gate's unchanged path makes a context, not torch

        return cls(config, steps, warn, executor_for(config.activations), dict(timings or {}))

    def replace_config(self, config: ScanConfig) -> RunContext:
        """The same run with another configuration (a profile's other model): its own clock, one executor."""
        return RunContext(config, self.steps, self.warn, self.executor)

    @contextmanager
    def timed(self, name: str):
        """Time a stage as ``timings[name]`` (added to, when a stage runs twice)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 3)

    @contextmanager
    def stage(self, name: str, description: str, unit: str = "steps", scale: float = 1.0):
        """Time a stage and show its progress bar; yields ``update(done, total, **figures)``."""
        with self.timed(name), self.steps(description, unit, scale=scale) as update:
            yield update

    @contextmanager
    def step(self, name: str, description: str):
        """A stage that reports no progress of its own: timed, and shown while it runs."""
        with self.stage(name, description) as update:
            update(0, 1)
            yield
            update(1, 1)
