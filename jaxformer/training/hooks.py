"""Periodic work around the train step, registered as hooks: `hooks.add(fn, every=N)` calls
`fn(info)` at the steps that are multiples of N (and at the run's last step with `at_last=True`);
`hooks.run(info)` calls the due ones in the order they were added. (levanter's trainer hooks)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jax

from jaxformer.training.state import TrainState


@dataclass(frozen=True)
class StepInfo:
    step: int  # updates the state has taken
    state: TrainState
    batch: dict[str, jax.Array]  # the batch of the update about to be taken, or just taken
    metrics: dict | None = None  # that update's metrics, still on the device (after it only)
    last: bool = False  # step is trainer.steps


@dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], None]
    every: int
    at_last: bool

    def due(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 or (self.at_last and info.last)


@dataclass
class Hooks:
    hooks: list[Hook] = field(default_factory=list)

    def add(self, fn: Callable[[StepInfo], None], *, every: int = 1, at_last: bool = False) -> None:
        """every=0 adds nothing: a trainer.*_every of 0 turns that work off."""
        if every:
            self.hooks.append(Hook(fn, every, at_last))

    def run(self, info: StepInfo) -> None:
        for hook in self.hooks:
            if hook.due(info):
                hook.fn(info)
