"""Training tasks, one per file, looked up by name (`config.task`).

A task owns what differs between objectives: the model head, the loss, the batch keys it reads, its evaluation
statistics and metrics, and the metric that selects a checkpoint by default (`base.Task`). The trainer, the
evaluators, predict and the sweep call only that interface. A new task is a new module holding a `Task` subclass
decorated with `@register("<name>")`; importing the module makes `config.task="<name>"` available.
"""

from __future__ import annotations

from avt_jax.tasks.base import Task, get, names, register

# The built-in tasks register themselves on import.
from avt_jax.tasks import classification, pretrain, regression  # pylint: disable=wrong-import-position,unused-import

__all__ = ["Task", "get", "names", "register", "from_config"]


def from_config(config) -> Task:
  """The task named by config.task, built for this (filled) config."""
  return get(config.task)(config)
