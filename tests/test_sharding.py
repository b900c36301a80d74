"""Sharding rules pinned by tests: a golden file of every parameter's PartitionSpec for the paper's base model on a
2x4 (data x fsdp) mesh, no large parameter left replicated under fsdp, optimizer state placed like the parameters,
and the batch assembly of `sharding.global_batch`.

The golden file is tests/golden/base_2x4_fsdp.txt. After an intended change of the rules or of the model's
parameters, regenerate it and review the diff:

  AVT_UPDATE_GOLDEN=1 /work/venv/bin/pytest -q tests/test_sharding.py -k golden
"""

import functools
import math
import os
import tempfile

import jax
import numpy as np
import pytest
from flax import linen as nn

from avt_jax import config_lib, input_pipeline, sharding, tasks
from avt_jax import setup as setup_lib
from avt_jax.models import avt

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "base_2x4_fsdp.txt")
# Parameters above this many elements must never stay fully replicated when the mesh has fsdp > 1.
LARGE = 100_000
# Paper widths of the precomputed features: 512-d audio embeddings, 17 facial action-unit intensities.
AUDIO_DIM, VISUAL_DIM = 512, 17


def _config(size: str):
  cfg = config_lib.base_config("pretrain")
  cfg.model = avt.model_config(size, audio_frontend=dict(type="features", dim=AUDIO_DIM),
                               visual_frontend=dict(type="features", dim=VISUAL_DIM),
                               audio_target_dim=AUDIO_DIM, visual_target_dim=VISUAL_DIM)
  cfg.batch_size = 8
  return cfg


def _mesh(mesh_cfg: dict):
  return sharding.make_mesh(mesh_cfg, devices=jax.devices()[:math.prod(mesh_cfg.values())])


def _dummy(cfg):
  geometry = input_pipeline.Geometry("features", 1, AUDIO_DIM, 1, VISUAL_DIM, 0, 0)
  return input_pipeline.dummy_batch(geometry, cfg.batch_size, 8)


@functools.lru_cache(maxsize=None)
def _boxed(size: str):
  """Abstract parameters (nn.Partitioned boxes carrying logical axis names) and each parameter's names."""
  cfg = _config(size)
  boxed = jax.eval_shape(lambda: tasks.from_config(cfg).model.init(jax.random.key(0), _dummy(cfg)))["params"]
  names = {}
  specs = nn.get_partition_spec(boxed)
  for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.P))[0]:
    names["/".join(k.key for k in path)] = tuple(spec)
  return boxed, names


def _param_shardings(size: str, mesh_cfg: dict):
  """Parameters as ShapeDtypeStructs with the shardings of the default rules on `mesh_cfg`."""
  boxed, names = _boxed(size)
  mesh = _mesh(mesh_cfg)
  shardings = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        sharding.strip_boxes(boxed), shardings)
  return params, names, mesh


def _state(size: str, mesh_cfg: dict):
  """The trainer's abstract train state (params + optimizer state, with shardings), as `setup.build` makes it."""
  cfg = _config(size)
  mesh = _mesh(mesh_cfg)
  geometry = input_pipeline.Geometry("features", 1, AUDIO_DIM, 1, VISUAL_DIM, 0, 0)
  abstract = setup_lib.build(cfg, geometry, mesh=mesh, max_tokens=8).abstract_state
  return abstract, _boxed(size)[1], mesh


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _golden_text(abstract, names) -> str:
  lines = ["# Sharding of every parameter of the base model (features frontends 512 / 17) on the mesh",
           "# data=2, fsdp=4, tensor=1 with avt_jax.sharding.DEFAULT_RULES.",
           "# Columns: parameter, shape, logical axes, PartitionSpec.",
           "# Regenerate: AVT_UPDATE_GOLDEN=1 /work/venv/bin/pytest -q tests/test_sharding.py -k golden"]
  for name, shape, spec in sharding.describe(abstract["params"]):
    axes = ",".join(str(a) for a in names[name])
    lines.append(f"{name}  {list(shape)}  ({axes})  {spec}")
  return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def base_2x4():
  return _state("base", {"data": 2, "fsdp": 4, "tensor": 1})


def test_golden_base_2x4_fsdp(base_2x4):
  abstract, names, _ = base_2x4
  text = _golden_text(abstract, names)
  if os.environ.get("AVT_UPDATE_GOLDEN") == "1":
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(GOLDEN), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, GOLDEN)
  assert os.path.exists(GOLDEN), f"{GOLDEN} is missing; create it with AVT_UPDATE_GOLDEN=1 (see module docstring)"
  want = open(GOLDEN).read().splitlines()
  got = text.splitlines()
  changed = sorted(set(want) ^ set(got))
  assert not changed, ("sharding differs from the golden file (- golden, + now); if intended, regenerate with "
                       "AVT_UPDATE_GOLDEN=1:\n" + "\n".join(("- " if l in want else "+ ") + l for l in changed[:40]))
  assert want == got  # Same lines in the same order.


def test_golden_covers_every_parameter_of_the_release_encoder(base_2x4):
  abstract, _, _ = base_2x4
  rows = [l for l in open(GOLDEN).read().splitlines() if l and not l.startswith("#")]
  counts = [math.prod(eval(l.split("  ")[1])) for l in rows]  # pylint: disable=eval-used
  enc = sum(n for l, n in zip(rows, counts) if l.startswith("encoder/"))
  # 16,767,600: the encoder path of the released base model (PAPER.md).
  assert enc == 16_767_600
  assert len(rows) == len(jax.tree.leaves(abstract["params"]))


MESHES = [
    {"data": 2, "fsdp": 4, "tensor": 1},
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 1, "fsdp": 4, "tensor": 2},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 1, "fsdp": 2, "tensor": 4},
]


def _ways(spec, mesh) -> int:
  """Into how many pieces a PartitionSpec cuts an array on `mesh`."""
  n = 1
  for axes in spec:
    for a in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
      n *= mesh.shape[a]
  return n


@pytest.mark.parametrize("size", ["base", "large"])
@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_no_large_parameter_stays_replicated(size, mesh_cfg):
  params, names, mesh = _param_shardings(size, mesh_cfg)
  fsdp, tensor = mesh_cfg["fsdp"], mesh_cfg["tensor"]
  problems = []
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, x in flat:
    name, n = _path(path), math.prod(x.shape)
    if n <= LARGE:
      continue
    ways = _ways(x.sharding.spec, mesh)
    want = fsdp
    # Attention projections and MLP kernels also split over `tensor` when it divides their heads / hidden width.
    for axis_name, dim in zip(names[name], x.shape):
      if axis_name in ("heads", "mlp") and dim % tensor == 0:
        want *= tensor
    if ways < want:
      problems.append(f"{name} {x.shape} {x.sharding.spec}: {ways}-way, expected >= {want}")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("mesh_cfg", [{"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1}])
def test_parameter_memory_per_device_shrinks_with_fsdp(mesh_cfg):
  params, _, _ = _param_shardings("large", mesh_cfg)
  total = per_device = 0
  for x in jax.tree.leaves(params):
    total += math.prod(x.shape)
    per_device += math.prod(x.sharding.shard_shape(x.shape))
  # Only LayerNorm / bias vectors whose width fsdp does not divide may stay whole: at most 1% above total / fsdp.
  assert total / mesh_cfg["fsdp"] <= per_device <= 1.01 * total / mesh_cfg["fsdp"], (per_device, total)


def test_optimizer_state_is_placed_like_the_parameters(base_2x4):
  abstract, _, mesh = base_2x4
  params = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]}
  matched = 0
  for path, x in jax.tree_util.tree_flatten_with_path(abstract["opt_state"])[0]:
    name = _path(path)
    owner = [p for p in params if name.endswith("/" + p)]
    if owner:
      matched += 1
      p = params[owner[0]]
      assert x.shape == p.shape and x.sharding == p.sharding, (name, x.sharding.spec, p.sharding.spec)
    else:  # Counters and other non-parameter state: replicated scalars.
      assert x.shape == () and x.sharding.is_fully_replicated, (name, x.shape, x.sharding)
  assert matched == 2 * len(params)  # Adam's first and second moments.
  assert abstract["step"].sharding.is_fully_replicated


def test_indivisible_dimensions_stay_replicated_on_that_axis():
  params, _, _ = _param_shardings("base", {"data": 1, "fsdp": 2, "tensor": 4})
  layer = params["encoder"]["joint"]["layer_0"]
  # 10 heads: tensor=4 does not divide them, so only the width (480) is split over fsdp.
  assert layer["attention"]["query"]["kernel"].sharding.spec == jax.P("fsdp", None, None)
  assert layer["attention"]["query"]["bias"].sharding.spec == jax.P(None, None)
  # 480 x 1920 MLP kernel: width over fsdp=2, hidden over tensor=4.
  assert layer["fc1"]["kernel"].sharding.spec == jax.P("fsdp", "tensor")
  # Visual reconstruction output: 17 targets are not split, the width is.
  out = params["recon_visual"]["out"]["kernel"]
  assert out.shape == (480, 17) and out.sharding.spec == jax.P("fsdp", None)


def test_global_batch_splits_the_leading_axis_over_data_and_fsdp():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  local = {"audio": np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2), "mask": np.ones((8, 3), bool)}
  batch = sharding.global_batch(local, mesh)
  np.testing.assert_array_equal(np.asarray(batch["audio"]), local["audio"])
  shard_rows = sorted(int(s.data[0, 0, 0]) // 6 for s in batch["audio"].addressable_shards)
  assert shard_rows == list(range(8))  # One clip per device, each clip on exactly one device.
  assert batch["audio"].sharding.spec == jax.P(("data", "fsdp"))


# ----- DevicePrefetch ---------------------------------------------------------------------------------------------


def _sample_iterator():
  return iter(input_pipeline.make_dataset(config_lib.SYNTH, split="train", global_batch_size=8, seed=1, max_tokens=6,
                                          process_index=0, process_count=1, finish=False))


def test_device_prefetch_gives_the_batches_on_the_mesh_and_the_state_of_the_last_one_handed_out():
  mesh = _mesh({"data": 4})
  plain = _sample_iterator()
  want = [next(plain) for _ in range(6)]
  states = []
  fetch = sharding.DevicePrefetch(_sample_iterator(), mesh, size=3)
  for k in range(4):
    got = next(fetch)
    assert got["audio"].sharding == sharding.batch_sharding(mesh)
    for key, value in want[k].items():
      np.testing.assert_array_equal(np.asarray(got[key]), value)
    states.append(fetch.get_state())
  # Three batches beyond the fourth are already prefetched, yet the state is that of batch 4: a checkpoint
  # written now resumes at batch 5.
  resumed = sharding.DevicePrefetch(_sample_iterator(), mesh)
  resumed.set_state(states[1])
  for k in (2, 3, 4, 5):
    np.testing.assert_array_equal(np.asarray(next(resumed)["visual"]), want[k]["visual"])
  fetch.set_state(states[0])  # rewinds a running prefetch: what it had fetched is dropped
  np.testing.assert_array_equal(np.asarray(next(fetch)["visual"]), want[1]["visual"])
  fetch.close()
  resumed.close()


class _Batches:
  """A checkpointable iterator of `n` small batches that raises `error` at batch `fail_at` (1-based)."""

  def __init__(self, n, fail_at=0):
    self.n, self.fail_at, self.i = n, fail_at, 0

  def __next__(self):
    self.i += 1
    if self.i == self.fail_at:
      raise ValueError(f"record shard-00001[{self.i}] is broken")
    if self.i > self.n:
      raise StopIteration
    return {"x": np.full((8, 2), self.i, np.float32)}

  def get_state(self):
    return {"i": self.i}


def test_device_prefetch_raises_the_pipelines_error_in_the_consumer_and_ends_with_the_data():
  fetch = sharding.DevicePrefetch(_Batches(5, fail_at=3), _mesh({"data": 2}))
  assert [float(next(fetch)["x"][0, 0]) for _ in range(2)] == [1.0, 2.0]
  with pytest.raises(ValueError, match=r"shard-00001\[3\] is broken"):
    next(fetch)
  fetch.close()
  short = sharding.DevicePrefetch(_Batches(1), _mesh({"data": 2}))
  next(short)
  for _ in range(2):  # the end is final
    with pytest.raises(StopIteration):
      next(short)
  short.close()
