"""Where a run's metrics go: CLU writers (TensorBoard and the log) and <workdir>/metrics.jsonl, one JSON row per
(step, split); and trimming metrics.jsonl back to a resumed step."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

from avt_jax import records


def _jsonl_writer_class():
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

  class JsonlWriter(metric_writers.MetricWriter):
    """Writes one JSON object per (step, split): {"step": .., "split": .., name: value, ...}.

    Scalar names are "<split>/<name>"; names without a split go to split "train".
    """

    def __init__(self, path: str):
      self._path = epath.Path(path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
      by_split: dict[str, dict[str, float]] = {}
      for name, value in scalars.items():
        split, _, key = name.rpartition("/")
        by_split.setdefault(split or "train", {})[key] = float(np.asarray(value))
      with self._path.open("a") as f:
        for split, vals in by_split.items():
          f.write(json.dumps({"step": int(step), "split": split, **vals}) + "\n")

    def write_summaries(self, step, values, metadata=None):
      pass

    def write_images(self, step, images):
      pass

    def write_videos(self, step, videos):
      pass

    def write_audios(self, step, audios, *, sample_rate):
      pass

    def write_texts(self, step, texts):
      pass

    def write_histograms(self, step, arrays, num_buckets=None):
      pass

    def write_hparams(self, hparams):
      pass

    def flush(self):
      pass

    def close(self):
      pass

  return JsonlWriter


class MetricsError(RuntimeError):
  """Writing a run's metrics failed (a full disk, a lost permission); the message names the workdir."""


class _Checked:
  """Forwards to a metric writer; what its writes and flushes raise (OSError from metrics.jsonl, TensorFlow's own
  error types, often without a message, from the event file) becomes MetricsError naming the workdir."""

  def __init__(self, writer: Any, workdir: str):
    self._writer, self._workdir = writer, workdir

  def __getattr__(self, name: str) -> Any:
    method = getattr(self._writer, name)

    @functools.wraps(method)
    def checked(*args, **kwargs):
      try:
        return method(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-except
        cause = " ".join(str(e).split()) or "no message (the log above may say more)"
        raise MetricsError(f"writing the metrics of {self._workdir} ({name}) failed: {type(e).__name__}: "
                           f"{cause}") from e

    return checked


def make_writer(workdir: str):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  JsonlWriter = _jsonl_writer_class()  # pylint: disable=invalid-name
  if jax.process_index() > 0:
    return metric_writers.LoggingWriter()
  return _Checked(metric_writers.MultiWriter([metric_writers.create_default_writer(workdir, asynchronous=False),
                                              JsonlWriter(os.path.join(workdir, METRICS))]), workdir)


METRICS = "metrics.jsonl"


def drop_metrics_after(workdir: str, step: int) -> int:
  """Rewrites <workdir>/metrics.jsonl without the rows after `step` (written by a run that did not reach its next
  checkpoint; the resumed run writes them again). Returns the number of rows dropped."""
  path = os.path.join(workdir, METRICS)
  if jax.process_index() > 0 or not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row_step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError) as e:  # A line cut by a kill mid-write: it is dropped with the rest.
      logging.warning("%s:%d: unreadable row dropped (%s)", path, n, e)
      continue
    if row_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  dropped = len([l for l in lines if l.strip()]) - len(kept)
  if dropped:
    records.write_atomic(path, "".join(kept))
    logging.info("%s: dropped %d rows after step %d (they are written again)", path, dropped, step)
  return dropped
