r"""Encoder features of every clip of a prepared dataset, for linear probes, clustering and downstream models.

  python -m avt_jax.embed --workdir=<run or converted release dir> --data=<prepared dir> --output=<file.npz>
      [--batch_size=16] [--max_tokens=N]

The clips go through the input pipeline exactly as in evaluation (record order, crop from token 0 to
`max_tokens` tokens, default the run's data.max_tokens; inputs scaled as the encoder was trained: the run's
normalization.json, 'none' for converted release weights). The parameters are those of the run's selected
checkpoint (<workdir>/best, else its newest). The .npz holds `clip_ids` [N] (str), `features` [N, T, 2 * width]
float32 (the encoder output; frames past a clip's length are zero) and `mask` [N, T] bool.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Sequence

import numpy as np

from avt_jax import config_lib, records


class EmbedError(RuntimeError):
  """The run or the data cannot be used; the message names the file and the reason."""


def run_config(workdir: str):
  """The run's config.json as a config; a converted release checkpoint (a model config) becomes a pretraining
  config around it."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise EmbedError(f"{path}: not found; --workdir must be a run directory (python -m avt_jax.main) or a "
                     f"converted release checkpoint (python -m avt_jax.convert_release)")
  raw = records.read_json(path, "run config", object_only=True)
  if "mode" in raw:
    return ml_collections.ConfigDict(config_lib.from_json(raw))
  config = config_lib.base_config("pretrain")
  model = {k: v for k, v in config_lib.from_json(raw).items() if k != "converted_from"}
  config.model = ml_collections.ConfigDict(model)
  config.model.size = "custom"
  return config


def embed(workdir: str, data: str, *, batch_size: int = 16, max_tokens: int = 0) -> dict[str, np.ndarray]:
  """{"clip_ids", "features", "mask"} of every clip of the prepared directory `data`."""
  import jax  # pylint: disable=g-import-not-at-top
  from avt_jax import input_pipeline, sharding  # pylint: disable=g-import-not-at-top
  from avt_jax import setup as setup_lib  # pylint: disable=g-import-not-at-top

  workdir, data = config_lib.absolute_path(workdir), config_lib.absolute_path(data)
  config = run_config(workdir)
  sources, geometry = input_pipeline.open_sources(data)
  t = int(max_tokens or config.data.max_tokens)
  with config.unlocked():
    s = setup_lib.build(config, geometry, optimizer=False, batch_size=batch_size, max_tokens=t,
                        mesh=sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  params = s.restore_params(workdir, prefer_best=True)
  normalization = setup_lib.saved_normalization(workdir)
  features = jax.jit(lambda p, b: s.task.apply(p, b, None, False)["features"])
  ds = input_pipeline.make_dataset(data, split="eval", global_batch_size=batch_size, seed=0, max_tokens=t,
                                   process_index=0, process_count=1, keys=s.task.batch_keys,
                                   normalization=normalization)
  out, masks, weights = [], [], []
  with s.scope():
    for batch in ds:
      h = np.asarray(features(params, batch), np.float32)
      out.append(np.where(batch["mask"][..., None], h, 0.0))
      masks.append(batch["mask"])
      weights.append(batch["weight"])
  keep = np.concatenate(weights) > 0
  ids = [str(r["clip_id"]) for r in input_pipeline.read_metadata(data, sources[0].info)]
  result = {"clip_ids": np.asarray(ids), "features": np.concatenate(out)[keep], "mask": np.concatenate(masks)[keep]}
  if len(ids) != len(result["features"]):
    raise EmbedError(f"{data}: {len(ids)} clip ids but {len(result['features'])} clips embedded")
  return result


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m avt_jax.embed", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="Run directory or converted release checkpoint.")
  parser.add_argument("--data", required=True, help="Prepared dataset directory (python -m data.prepare).")
  parser.add_argument("--output", required=True, help="The .npz to write (atomically).")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--max_tokens", type=int, default=0, help="Tokens per clip (0: the run's data.max_tokens).")
  args = parser.parse_args(argv)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    result = embed(args.workdir, args.data, batch_size=args.batch_size, max_tokens=args.max_tokens)
    buf = io.BytesIO()
    np.savez(buf, **result)
    output = config_lib.absolute_path(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    records.write_atomic(output, buf.getvalue())
  except (EmbedError, records.RecordError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({"output": output, "clips": int(len(result["clip_ids"])),
                    "features": list(result["features"].shape)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
