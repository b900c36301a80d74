"""One setup path for every program that runs a model: trainer, evaluation, predict, sweep, bench and summary.

  config + dataset geometry -> task and model -> mesh and rules -> abstract state with shardings -> jitted, sharded
  init -> restore (own checkpoint > init_from > fresh)

`build` does the first four steps without touching a device; `Setup.init` materialises a fresh state already
sharded (the init batch is made from shapes inside the jitted init, so no batch is ever placed on device 0);
`Setup.initial_state` applies the restore precedence of a training run; `Setup.restore_params` takes the parameters
of any run or checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from absl import logging
from etils import epath
from flax import linen as nn

from avt_jax import checkpointing, input_pipeline, optim, records, sharding, tasks
from avt_jax.models import avt


# ----------------------------------------------------------------------------------------------------------------
# The model config from the dataset geometry.


def geometry_from_model(config) -> input_pipeline.Geometry | None:
  """The input geometry implied by a features-kind model config with explicit widths, else None."""
  a, v = config.model.audio_frontend, config.model.visual_frontend
  if a.get("type") == v.get("type") == "features" and a.get("dim", 0) > 0 and v.get("dim", 0) > 0:
    return input_pipeline.Geometry(kind="features", audio_frames=1, audio_dim=int(a.dim), visual_frames=1,
                                   visual_dim=int(v.dim), visual_size=0, target_size=0)
  return None


def fill_model_config(config, geometry: input_pipeline.Geometry) -> None:
  """Sets the size preset, the frontends' types and the reconstruction target widths from the dataset geometry."""
  m = config.model
  with m.unlocked():
    if m.size in avt.PRESETS:   # `--config.model.size=large` sets width, heads and layers; 'custom' keeps them.
      m.update(avt.PRESETS[m.size])
    elif m.size != "custom":
      raise ValueError(f"config.model.size={m.size!r}; expected one of {sorted(avt.PRESETS)} or 'custom'")
    raw = geometry.kind == "raw"
    want_a, want_v = ("logmel", "face") if raw else ("features", "features")
    for key, want in (("audio_frontend", want_a), ("visual_frontend", want_v)):
      kind = m[key].get("type", "auto")
      if kind == "auto":
        m[key].type = want
      elif kind != want:
        raise ValueError(f"config.model.{key}.type={kind!r} does not fit the {geometry.kind!r} dataset "
                         f"(expected {want!r})")
    m.audio_target_dim = geometry.audio_dim
    m.visual_target_dim = geometry.target_size ** 2 if raw else geometry.visual_dim
    m.audio_frontend.dim = geometry.audio_dim
    m.visual_frontend.dim = geometry.visual_dim if not raw else 3


# Model switches that change the computation but not the parameters: a restored encoder silently accepts them.
BEHAVIOUR_KEYS = ("causal", "padding_mask", "release_positions", "scan_layers")


def warn_model_differences(init_from: str, model_cfg) -> list[str]:
  """Logs a warning for each parameter-free model switch that differs from the run `init_from` was trained with."""
  path = epath.Path(init_from) / "config.json"
  if not path.exists():
    return []
  saved = json.loads(path.read_text())
  saved = saved.get("model", saved)
  diffs = [f"{k}: {saved[k]} there, {model_cfg.get(k)} here" for k in BEHAVIOUR_KEYS
           if k in saved and saved[k] != model_cfg.get(k)]
  for d in diffs:
    logging.warning("model.%s differs from %s (the encoder was trained that way)", d, path)
  return diffs


# ----------------------------------------------------------------------------------------------------------------
# Input normalisation carried with the encoder.

NORMALIZATION = "normalization.json"
NORMALIZATION_MODES = ("encoder", "dataset", "train", "none")


def saved_normalization(path: str) -> dict[str, Any] | None:
  """The normalization.json of the run `path` belongs to: the run directory, or its checkpoints/, best/ or one
  checkpoint step inside them (never a directory above the run)."""
  d = epath.Path(path)
  for _ in range(4):
    f = d / NORMALIZATION
    if f.exists():
      return records.read_json(f, "normalisation record", object_only=True)
    if not (d.name.isdigit() or d.name in ("checkpoints", "best")):
      return None
    d = d.parent
  return None


def resolve_normalization(config, sources, workdir: str | None = None) -> dict[str, Any]:
  """The statistics this run scales its inputs with (written to <workdir>/normalization.json by the trainer).

  A resumed run keeps its own. Otherwise config.data.normalization: 'encoder' (default) takes those of the encoder
  in config.init_from (a converted release checkpoint says 'none': raw TRILL / AU features), else the dataset's;
  'dataset' the prepared directory's statistics (over all its clips); 'train' computed over data.train's clips only
  (a fold's training speakers); 'none' leaves the inputs as stored. A choice that differs from the encoder's is
  logged.
  """
  own = epath.Path(workdir) / NORMALIZATION if workdir else None
  if own is not None and own.exists():  # a resumed run keeps the scale its checkpoints were trained with
    return records.read_json(own, "normalisation record", object_only=True)
  mode = config.data.get("normalization", "encoder") or "encoder"
  if mode not in NORMALIZATION_MODES:
    raise ValueError(f"config.data.normalization={mode!r}; expected one of {NORMALIZATION_MODES}")
  init_from = config.get("init_from", "")
  encoder = saved_normalization(init_from) if init_from else None
  if mode == "encoder":
    if encoder is not None:
      logging.info("inputs normalised as the encoder of %s was trained (%s)", init_from,
                   encoder.get("source", encoder.get("kind")))
      return encoder
    if init_from:
      logging.warning("%s has no %s (a run from before it was recorded): the inputs are normalised with the "
                      "dataset's statistics", init_from, NORMALIZATION)
    mode = "dataset"
  if mode == "dataset":
    out = input_pipeline.normalization_of(sources[0].info, f"{sources[0].name}/{records.DATASET_INFO}")
  elif mode == "train":
    out = input_pipeline.compute_normalization(sources, "data.train clips")
  else:
    out = dict(input_pipeline.NO_NORMALIZATION)
  if encoder is not None and _stats_only(encoder) != _stats_only(out):
    logging.warning("inputs normalised with %s (config.data.normalization=%r), not as the encoder of %s was "
                    "trained (%s)", out.get("source", out["kind"]), mode, init_from,
                    encoder.get("source", encoder.get("kind")))
  return out


def _stats_only(norm: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in norm.items() if k != "source"}


# ----------------------------------------------------------------------------------------------------------------
# The setup.


@dataclasses.dataclass
class Setup:
  """Everything needed to run the config's model on a mesh; built by `build`.

  `abstract_state` ({"step", "params", "opt_state"} ShapeDtypeStructs carrying their shardings) and
  `state_shardings`, `tx`, `schedule` exist only when built with the optimizer; `abstract_params` always.
  """

  config: Any
  task: tasks.Task
  geometry: input_pipeline.Geometry
  mesh: jax.sharding.Mesh
  rules: tuple
  batch_size: int
  max_tokens: int
  abstract_params: Any
  param_shardings: Any
  batch_shardings: dict[str, Any]
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  # What the training input pipeline delivers (input_pipeline.stored_keys: inputs at stored scale, no targets);
  # the train step finishes it on the devices (`finisher`).
  abstract_stored_batch: dict[str, jax.ShapeDtypeStruct]
  abstract_state: Any = None
  state_shardings: Any = None
  tx: optax.GradientTransformation | None = None
  schedule: Callable | None = None
  normalization: dict[str, Any] | None = None  # None: each dataset's own statistics
  _init: Callable | None = None

  @property
  def model(self) -> nn.Module:
    return self.task.model

  def finisher(self) -> input_pipeline.BatchFinisher:
    """Stored-scale batch -> the task's model batch, with this run's normalisation (`normalization`, resolved by
    the trainer; unscaled inputs if it was never set, as in benchmarks on synthetic data)."""
    return input_pipeline.BatchFinisher(self.geometry, self.normalization or input_pipeline.NO_NORMALIZATION,
                                        self.task.batch_keys)

  @contextlib.contextmanager
  def scope(self):
    """The mesh and the logical-axis rules every trace, compile and restore of this setup runs under."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def init(self):
    """A fresh train state, initialised on the devices with its shardings."""
    if self._init is None:
      raise ValueError("this setup was built without the optimizer (build(..., optimizer=False)): no train state")
    with self.scope():
      return self._init()

  def restore_params(self, path: str, prefer_best: bool = False):
    """The parameters of a run directory or checkpoint (its best/ first with `prefer_best`), sharded."""
    with self.scope():
      return checkpointing.restore_params(path, self.abstract_params, prefer_best=prefer_best)

  def initial_state(self, make_manager: Callable[[], Any], data_iter=None,
                    on_other_process_count: Callable[[int], None] | None = None):
    """The state a training run starts from: its own newest intact checkpoint (resume, with the data iterator),
    else a fresh state with the encoder of config.init_from (fine-tuning), else a fresh state.

    Returns (manager, resumed step or None, state).
    """
    with self.scope():
      manager, latest, state = checkpointing.restore_latest_intact(make_manager, self.abstract_state, data_iter,
                                                                   on_other_process_count)
      if latest is not None:
        logging.info("resumed from %s at step %d", manager.directory, latest)
        return manager, latest, state
      state = self._init()
      init_from = self.config.get("init_from", "")
      if init_from:
        logging.info("initialising the encoder from %s", init_from)
        warn_model_differences(init_from, self.config.model)
        enc = checkpointing.restore_encoder(init_from, self.abstract_params["encoder"])
        params = dict(state["params"], encoder=enc)
        state = dict(state, params=jax.device_put(params, self.state_shardings["params"]))
      return manager, None, state


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build(config, geometry: input_pipeline.Geometry, *, optimizer: bool = True, mesh: jax.sharding.Mesh | None = None,
          devices: Sequence[jax.Device] | None = None, batch_size: int | None = None,
          max_tokens: int | None = None) -> Setup:
  """The setup of `config` for data of `geometry`; fills config.model from the geometry (in place).

  mesh: default config.mesh over `devices` (default all). batch_size / max_tokens: the batch shape the model is
  traced with (default config.batch_size / config.data.max_tokens). Nothing is placed on a device.
  """
  fill_model_config(config, geometry)
  task = tasks.from_config(config)
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config.mesh.get("rules") if config.get("mesh") else None)
  batch_size = int(batch_size or config.batch_size)
  max_tokens = int(max_tokens or config.data.max_tokens)
  shapes = input_pipeline.batch_shapes(geometry, batch_size, max_tokens, task.batch_keys)
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in shapes}
  abstract_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_shardings[k]) for k, (s, d) in shapes.items()}
  stored = input_pipeline.batch_shapes(geometry, batch_size, max_tokens, input_pipeline.stored_keys(task.batch_keys))
  abstract_stored_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh))
                           for k, (s, d) in stored.items()}
  rng = jax.random.key(config.seed)

  def init_variables(key):
    k_params, k_drop = jax.random.split(key)
    batch = {k: jnp.zeros(s, d) for k, (s, d) in shapes.items()}  # Parameters depend on the shapes only.
    return task.model.init({"params": k_params, "dropout": k_drop}, batch, deterministic=True)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_variables, rng)["params"]
    param_shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract_params = _with_shardings(sharding.strip_boxes(boxed), param_shardings)
    out = Setup(config=config, task=task, geometry=geometry, mesh=mesh, rules=rules, batch_size=batch_size,
                max_tokens=max_tokens, abstract_params=abstract_params, param_shardings=param_shardings,
                batch_shardings=batch_shardings, abstract_batch=abstract_batch,
                abstract_stored_batch=abstract_stored_batch)
    if not optimizer:
      return out
    tx, schedule = optim.make_optimizer(config.optimizer, sharding.strip_boxes(boxed))

    def init_state(key):
      params = nn.meta.unbox(init_variables(key)["params"])
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    abstract_state = jax.eval_shape(init_state, rng)
    repl = sharding.replicated(mesh)
    opt_shardings = optim.map_state_params(tx, lambda _, s: s, abstract_state["opt_state"], param_shardings,
                                           non_params=lambda _: repl)
    state_shardings = {"step": repl, "params": param_shardings, "opt_state": opt_shardings}
    init_fn = jax.jit(init_state, out_shardings=state_shardings)
    out.abstract_state = _with_shardings(abstract_state, state_shardings)
    out.state_shardings, out.tx, out.schedule = state_shardings, tx, schedule
    out._init = lambda: init_fn(rng)  # pylint: disable=protected-access
  return out
