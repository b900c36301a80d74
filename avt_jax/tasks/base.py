"""The task interface and its registry (see avt_jax/tasks/__init__.py)."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import jax
from flax import linen as nn

_REGISTRY: dict[str, type["Task"]] = {}


def register(name: str) -> Callable[[type["Task"]], type["Task"]]:
  """Class decorator: makes a Task subclass available as config.task=`name`."""

  def wrap(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"task {name!r} is registered twice ({_REGISTRY[name].__module__} and {cls.__module__})")
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return wrap


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def get(name: str) -> type["Task"]:
  if name not in _REGISTRY:
    raise ValueError(f"config.task={name!r}; expected one of {names()} (a task registers itself with "
                     "avt_jax.tasks.register when its module is imported)")
  return _REGISTRY[name]


Batch = Mapping[str, jax.Array]


class Task:
  """One training objective. Subclasses set the class attributes and implement the four methods.

  Randomness: the trainer gives every call one key; `split_rng` turns it into (task key, dropout key), so a
  task's own sampling (e.g. masking) and dropout never share a stream, whichever task runs.
  """

  name: ClassVar[str] = ""
  # Keys of the batch the task reads; the input pipeline builds only these (docs/data_format.md).
  batch_keys: ClassVar[tuple[str, ...]] = ()
  # Entries of the loss's aux dict that are logged at every training log step (scalars).
  train_metrics: ClassVar[tuple[str, ...]] = ()
  # The validation metric that selects the checkpoint when config.select_metric is empty.
  default_selection: ClassVar[str] = ""
  # Metrics for which lower is better (all others: higher is better).
  minimize: ClassVar[frozenset[str]] = frozenset({"loss"})
  # The run mode that trains this task ('pretrain' or 'finetune'); config.mode must agree.
  train_mode: ClassVar[str] = "finetune"

  def __init__(self, config):
    self.config = config
    self.model = self.build_model(config.model)

  # --- To implement.

  def build_model(self, model_config) -> nn.Module:
    raise NotImplementedError

  def loss(self, params, batch: Batch, rng: jax.Array, train: bool) -> tuple[jax.Array, dict[str, Any]]:
    """(scalar loss, aux dict) of one batch; aux holds at least `train_metrics`."""
    raise NotImplementedError

  def eval_stats(self, params, batch: Batch, rng: jax.Array) -> Any:
    """Sufficient statistics of one (global) batch: a pytree of sums or clu Metrics, merged over batches."""
    raise NotImplementedError

  def finish(self, stats) -> dict[str, float]:
    """Named metrics from the merged statistics of a whole split (exact, never averages of batch values)."""
    raise NotImplementedError

  # --- Shared.

  @staticmethod
  def split_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    task_rng, dropout_rng = jax.random.split(rng)
    return task_rng, dropout_rng

  def apply(self, params, batch: Batch, dropout_rng: jax.Array | None, train: bool) -> dict[str, jax.Array]:
    rngs = {"dropout": dropout_rng} if train else {}
    return self.model.apply({"params": params}, batch, deterministic=not train, rngs=rngs)

  def predict(self, params, batch: Batch) -> jax.Array:
    """The model's output for a batch in evaluation mode (logits, attributes, ...)."""
    return self.apply(params, batch, None, False)["output"]

  def selection(self) -> tuple[str, str]:
    """(validation metric that selects the checkpoint, 'min' or 'max')."""
    metric = self.config.get("select_metric", "") or self.default_selection
    return metric, ("min" if metric in self.minimize else "max")


def merge_stats(acc, new):
  """Merges two statistics pytrees of `eval_stats` (clu Metrics merge, arrays add); acc may be None."""
  if acc is None:
    return new
  if isinstance(new, Mapping):
    return {k: merge_stats(acc[k], v) for k, v in new.items()}
  return acc.merge(new) if hasattr(new, "merge") else acc + new
