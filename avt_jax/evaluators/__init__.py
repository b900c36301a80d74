"""Evaluators, one per file, built by name from `config.evals`.

`config.evals` maps a name to {"type": <module in this package>, "data": <split of config.data (train, eval,
test) or a dataset spec>, "when": "during" | "final", ...}. The name prefixes the metrics ("eval/accuracy"); "during" evaluators run every
config.eval_every_steps steps and at the last step, "final" ones once at the end, on the checkpoint selected by the
evaluator with "select": True. An evaluator whose split of config.data is empty is left out.

An evaluator module defines `Evaluator(name, eval_config, setup)` with `run(params, max_batches=0) -> {metric:
value}`; a new evaluator is a new module here (its `type` is the module name).
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from avt_jax import config_lib

WHEN = ("during", "final")


def data_spec(config, value):
  """The dataset spec an evaluator's `data` (or another data field) names: a split of config.data with its filter,
  or a dataset spec given directly (a path, 'tfds:...', a mapping or a list)."""
  if isinstance(value, str) and value in config_lib.DATA_SPLITS:
    return config_lib.data_spec(config, value)
  return value.to_dict() if hasattr(value, "to_dict") else value


def configs(config) -> dict[str, dict[str, Any]]:
  """The evaluator configs of `config.evals` whose data split is given, checked, in config order."""
  out = {}
  selecting = []
  for name, ev in (config.get("evals") or {}).items():
    ev = dict(ev.to_dict() if hasattr(ev, "to_dict") else ev)
    if not isinstance(ev.get("type"), str) or not ev["type"]:
      raise ValueError(f"config.evals.{name}.type={ev.get('type')!r}; expected the name of a module of "
                       "avt_jax/evaluators")
    if not ev.get("data"):
      raise ValueError(f"config.evals.{name}.data={ev.get('data')!r}; expected a split of config.data (train, eval, "
                       "test) or a dataset spec")
    if ev.get("when", "during") not in WHEN:
      raise ValueError(f"config.evals.{name}.when={ev.get('when')!r}; expected one of {WHEN}")
    if ev.get("select"):
      selecting.append(name)
      if ev.get("when", "during") != "during":
        raise ValueError(f"config.evals.{name}: the evaluator that selects the checkpoint must run during "
                         "training (when='during')")
    if data_spec(config, ev["data"]):  # an empty split of config.data leaves its evaluators out
      out[name] = ev
  if len(selecting) > 1:
    raise ValueError(f"config.evals: {selecting} all have select=True; at most one evaluator selects the checkpoint")
  return out


def build(config, setup) -> dict[str, Any]:
  """{name: evaluator} for the evaluators of `configs(config)`."""
  out = {}
  for name, ev in configs(config).items():
    try:
      module = importlib.import_module(f"{__name__}.{ev['type']}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{ev['type']}":
        raise
      raise ValueError(f"config.evals.{name}.type={ev['type']!r}: no module avt_jax/evaluators/{ev['type']}.py") from e
    out[name] = module.Evaluator(name, ev, setup)
  return out


def selecting(evaluators: Mapping[str, Any]) -> str | None:
  """The name of the evaluator whose metrics select the checkpoint (None if there is none)."""
  return next((n for n, e in evaluators.items() if e.config.get("select")), None)
