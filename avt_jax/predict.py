r"""Emotion predictions for new videos with a fine-tuned run.

  python -m avt_jax.predict --workdir=<fine-tuned run> --video=<file or folder> [--output=predictions.json]
      [--timeline=timeline.png] [--window_tokens=N] [--hop_tokens=N] [--dataset_info=<dir or json>]

Paths may be relative to the current directory. --workdir must be a fine-tuning run (`python -m avt_jax.main`
with configs/finetune_*.py) that has written a checkpoint; a pretraining run has no emotion head: fine-tune it
first (`python -m avt_jax.main --config=configs/finetune_cremad.py --config.init_from=<pretraining run>
--workdir=<new run>`) and pass the new run.

What happens, per video:
  1. the run's config.json gives the model, the task and the training data; the parameters are those of the
     checkpoint selected on validation (<workdir>/best, else the newest checkpoint);
  2. the training data's dataset_info.json gives the extraction parameters (token rate, frame rate, face crop
     size, face-tracker settings, log-mel settings, decoder size limit) and the normalisation statistics; the video
     goes through the same extraction as `python -m data.prepare` (data.extract.extract_raw) and the same per-clip
     transform as evaluation (avt_jax.input_pipeline.ClipTransform);
  3. the clip is cut into windows of `window_tokens` tokens (default: the run's data.max_tokens, 5 tokens per
     second) starting every `hop_tokens` tokens (default: the window length, i.e. no overlap); when the windows
     do not reach the end of the clip, one more window ends exactly at the last token. A clip shorter than one
     window is a single (zero-padded, masked) window, as in training;
  4. classification: softmax probabilities per window and their mean over the windows (the clip-level result),
     with class names (config `class_names` if the run has them, CREMA-D's ANG DIS FEA HAP NEU SAD for 6
     classes); regression: the predicted attributes per window and their mean, named by config.loss.target_names.

The JSON (printed, and written atomically to --output) holds one entry per video. A video that cannot be used
(no face, no audio stream, no video stream, unreadable, too short) is reported with the file and the reason on
stderr and in the JSON ("error"); the exit status is then 1.

--timeline writes a PNG of the probabilities / values over time (for a folder: one PNG per video, in the
--timeline directory) and adds the curve's windows to the video's JSON entry ("timeline"). The curve has its own
windows, chosen per clip so that even a clip of a few seconds gives a curve rather than a single dot: the window
is data.max_tokens, shortened on a clip of fewer than data.max_tokens + 7 tokens to (tokens - 7), but never below
2 tokens, so that at least 8 windows fit; the hop is 1 token (0.2 s), larger on long clips so that the curve has
at most 200 points. --window_tokens / --hop_tokens, when given, replace these choices for the curve too. The
clip-level result always comes from the windows of step 3, which are those of training and evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from avt_jax import config_lib, records
from data import extract as extract_lib
from data import face as face_lib
from data import media as media_lib


# Reason prefixes of the clip errors (data.media / data.face / data.extract), so a message always says what is wrong.
_CATEGORIES = ((face_lib.NoFaceError, "no face"), (media_lib.NoAudioStreamError, "no audio stream"),
               (media_lib.NoVideoStreamError, "no video stream"), (media_lib.CorruptMediaError, "unreadable"),
               (extract_lib.TooShortError, "too short"))


class PredictError(RuntimeError):
  """The run or a video cannot be used; the message names the file and the reason."""


def clip_error_message(e: media_lib.ClipError) -> str:
  """'<path>: <category>: <reason>' for a clip error (the category is left out when the reason starts with it)."""
  category = next((c for cls, c in _CATEGORIES if isinstance(e, cls)), "cannot be used")
  reason = e.reason
  text = reason if reason.lower().startswith(category) else f"{category}: {reason}"
  return f"{e.path}: {text}"


# ----------------------------------------------------------------------------------------------------------------
# Run, data info and extraction parameters.
# ----------------------------------------------------------------------------------------------------------------


def _finetune_hint(workdir) -> str:
  return (f"fine-tune it first, e.g. python -m avt_jax.main --config=configs/finetune_cremad.py "
          f"--config.init_from={workdir} --workdir=<new run dir> (configs/finetune_msp_improv.py for arousal / "
          f"valence), then pass that run as --workdir")


def load_run_config(workdir: str):
  """The run's config.json as an ml_collections ConfigDict (lists as tuples, like the config files)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  wd = epath.Path(workdir)
  path = wd / "config.json"
  if not wd.exists():
    raise PredictError(f"--workdir={workdir}: no such directory; expected a fine-tuning run directory "
                       f"(python -m avt_jax.main with configs/finetune_*.py)")
  if not path.exists():
    raise PredictError(f"{path}: not found; --workdir must be a fine-tuning run directory (python -m avt_jax.main "
                       f"with configs/finetune_*.py)")
  try:
    raw = records.read_json(path, what="run config")
    config = ml_collections.ConfigDict(config_lib.from_json(raw))
  except records.RecordError as e:
    raise PredictError(str(e)) from e
  except (TypeError, ValueError) as e:
    raise PredictError(f"{path}: not a valid run config ({e})") from e
  mode, task = config.get("mode"), config.get("task")
  if mode == "pretrain":
    # A pretraining config still carries the default task field; only the mode says what the run learned.
    raise PredictError(f"{path}: {workdir} is a pretraining run (mode='pretrain'): its checkpoint holds the "
                       f"encoder and the reconstruction heads, no emotion head. Predictions need a fine-tuned run "
                       f"(task classification or regression); " + _finetune_hint(workdir))
  if mode is None and "converted_from" in raw:
    raise PredictError(f"{path}: {workdir} is a converted release checkpoint (python -m avt_jax.convert_release): "
                       f"a pretrained encoder with no emotion head; " + _finetune_hint(workdir))
  if mode == "eval":
    raise PredictError(f"{path}: {workdir} is an evaluation run (mode='eval') of init_from="
                       f"{config.get('init_from')!r}; pass that fine-tuned run as --workdir")
  if mode != "finetune":
    raise PredictError(f"{path}: mode={mode!r}; expected a fine-tuning run's config.json (mode='finetune', "
                       f"written by python -m avt_jax.main with configs/finetune_*.py)")
  if task not in ("classification", "regression"):
    raise PredictError(f"{path}: task={task!r}; expected 'classification' or 'regression'")
  return config


def checkpoint_dir(workdir: str) -> str:
  """The finished checkpoint predict restores: <workdir>/best's newest step, else <workdir>/checkpoints' newest."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  wd = epath.Path(workdir)
  for root in (wd / "best" / "checkpoints", wd / "checkpoints"):
    # Orbax finishes a step by renaming '<step>.orbax-checkpoint-tmp' to '<step>': only digit names are complete.
    steps = sorted(int(c.name) for c in root.iterdir() if c.name.isdigit() and (c / "state").exists()) if (
        root.exists()) else []
    if steps:
      return str(root / str(steps[-1]))
  raise PredictError(f"{workdir}: no checkpoint yet: neither {wd / 'best'} nor {wd / 'checkpoints'} holds a "
                     f"finished checkpoint (<step>/state). The trainer writes one every checkpoint_every_steps steps "
                     f"and at the end of training: let the run get that far (or resume it with the same "
                     f"python -m avt_jax.main command), then predict")


def load_training_info(config, override: str = "") -> dict[str, Any]:
  """dataset_info.json of the run's training data (or of `override`: a prepared directory or a json file)."""
  if override:
    path = os.path.join(override, records.DATASET_INFO) if os.path.isdir(override) else override
    try:
      return records.read_json(path, what="dataset_info.json")
    except records.RecordError as e:
      raise PredictError(f"--dataset_info={override}: {e}") from e
    except OSError as e:
      raise PredictError(f"--dataset_info={override}: cannot read {path} ({e})") from e
  from avt_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  spec = config_lib.data_spec(config, "train")
  hint = ("it holds the normalisation statistics and extraction parameters: give --dataset_info=<prepared dir or "
          "dataset_info.json>")
  try:
    if isinstance(spec, str) and not spec.startswith(input_pipeline.TFDS_PREFIX):
      return records.read_json(os.path.join(spec, records.DATASET_INFO), what="dataset_info.json")
    return input_pipeline.spec_info(spec)
  except records.RecordError as e:
    raise PredictError(f"training data data.train={spec!r}: {e}; {hint}") from e
  except (OSError, KeyError, ValueError) as e:
    raise PredictError(f"cannot read the training data's dataset_info.json for data.train={spec!r} ({e}); "
                       f"{hint}") from e


def extract_config_from_info(info: Mapping[str, Any]) -> extract_lib.ExtractConfig:
  """The ExtractConfig that produced the training data, as a PredictError where it cannot be rebuilt."""
  if info.get("kind") != "raw":
    raise PredictError(f"the run was trained on kind={info.get('kind')!r} data (precomputed features); predictions "
                       f"from video need a run trained on raw log-mel + face data")
  try:
    return extract_lib.ExtractConfig.from_info(info)
  except ValueError as e:
    raise PredictError(f"dataset_info.json: {e}") from e


def class_names(config, info: Mapping[str, Any] | None = None) -> list[str]:
  n = int(config.model.num_classes)
  for where in (config, config.get("data", {}), config.get("model", {})):
    names = where.get("class_names") if hasattr(where, "get") else None
    if names and len(names) == n:
      return [str(x) for x in names]
  datasets = set((info or {}).get("datasets", {}))
  flt = (config.data.get("train_filter") or {}).get("where", {}) if config.get("data") else {}
  datasets = set(flt.get("dataset", ())) or datasets
  known = [records.CLASS_NAMES[d] for d in datasets if d in records.CLASS_NAMES and len(records.CLASS_NAMES[d]) == n]
  if len(known) == 1:
    return list(known[0])
  if n == len(records.CLASS_NAMES["crema_d"]):
    return list(records.CLASS_NAMES["crema_d"])
  return [f"class_{k}" for k in range(n)]


def target_names(config) -> list[str]:
  k = int(config.model.num_targets)
  names = list(config.get("loss", {}).get("target_names", ()))
  return [str(x) for x in names] if len(names) == k else [f"target_{j}" for j in range(k)]


def windows(num_tokens: int, window: int, hop: int) -> list[tuple[int, int]]:
  """(start, length) of the windows over a clip of `num_tokens` tokens.

  Starts 0, hop, 2 hop, ... while a full window fits; if these do not reach the last token, one more full window
  ends at it. A clip shorter than `window` gives one window of its own length.
  """
  if window < 1 or hop < 1:
    raise ValueError(f"window ({window}) and hop ({hop}) must be >= 1")
  if num_tokens < 1:
    return []
  if num_tokens <= window:
    return [(0, num_tokens)]
  starts = list(range(0, num_tokens - window + 1, hop))
  if starts[-1] + window < num_tokens:
    starts.append(num_tokens - window)
  return [(s, window) for s in starts]


# The timeline's own windows (module docstring): enough points for a curve, capped so long clips stay cheap.
TIMELINE_MIN_POINTS = 8
TIMELINE_MAX_POINTS = 200
TIMELINE_MIN_WINDOW = 2  # a single token (0.2 s) is too little context for a meaningful prediction


def timeline_windows(num_tokens: int, max_tokens: int, window: int = 0, hop: int = 0) -> tuple[int, int]:
  """(window, hop) in tokens of the timeline curve of a clip of `num_tokens` tokens; a non-zero argument is kept.

  Window: the longest up to `max_tokens` that leaves TIMELINE_MIN_POINTS windows one token apart, at least
  TIMELINE_MIN_WINDOW tokens. Hop: 1 token, grown on long clips to give at most TIMELINE_MAX_POINTS windows.
  """
  if not window:
    window = min(max_tokens, max(TIMELINE_MIN_WINDOW, num_tokens - (TIMELINE_MIN_POINTS - 1)))
  if not hop:
    hop = max(1, -(-(num_tokens - window) // (TIMELINE_MAX_POINTS - 1)))
  return int(window), int(hop)


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------------
# The predictor.
# ----------------------------------------------------------------------------------------------------------------


class Predictor:
  """Loads a fine-tuned run once; `predict(path)` returns the JSON-able result for one video."""

  def __init__(self, workdir: str, *, window_tokens: int = 0, hop_tokens: int = 0, dataset_info: str = "",
               batch_size: int = 8):
    import jax  # pylint: disable=g-import-not-at-top
    from avt_jax import checkpointing  # pylint: disable=g-import-not-at-top
    from avt_jax import setup as setup_lib  # pylint: disable=g-import-not-at-top

    self.workdir = workdir = config_lib.absolute_path(workdir)
    self.config = config = load_run_config(workdir)
    self.params_dir = checkpoint_dir(workdir)  # before any slow work: a run without a checkpoint fails at once
    self.info = load_training_info(config, config_lib.absolute_path(dataset_info))
    self.extract_config = extract_config_from_info(self.info)
    if window_tokens < 0 or hop_tokens < 0:
      raise PredictError(f"--window_tokens={window_tokens} and --hop_tokens={hop_tokens} must be >= 1 (0: default)")
    self.max_tokens = int(config.data.max_tokens)
    self.window_arg, self.hop_arg = int(window_tokens), int(hop_tokens)  # 0 = not given (timeline chooses)
    self.window = self.window_arg or self.max_tokens
    self.hop = self.hop_arg or self.window
    self.batch_size = max(1, int(batch_size))
    self.task = config.task
    self.names = class_names(config, self.info) if self.task == "classification" else target_names(config)
    # One device: a few windows per call; the parameters are restored onto it whatever mesh trained them.
    from avt_jax import input_pipeline, sharding  # pylint: disable=g-import-not-at-top
    self.setup = setup_lib.build(config, input_pipeline.Geometry.from_info(self.info), optimizer=False,
                                 mesh=sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
                                 batch_size=self.batch_size, max_tokens=self.window)
    self.keys = self.setup.task.batch_keys
    # The inputs are scaled as in the run's training and evaluation (runs from before normalization.json: the
    # training data's statistics, as they were then).
    self.normalization = setup_lib.saved_normalization(workdir)
    self.transform = self._transform(self.window)
    try:
      self.params = self.setup.restore_params(self.params_dir)
    except (FileNotFoundError, checkpointing.CheckpointMismatchError) as e:
      raise PredictError(f"{workdir}: cannot restore the fine-tuned parameters: {e}") from e
    self._apply = jax.jit(self.setup.task.predict)
    self.params_dir = os.path.join(self.params_dir, checkpointing.STATE)

  def _transform(self, length: int):
    """The evaluation transform padding to `length` tokens (one per window length used)."""
    from avt_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    cache = self.__dict__.setdefault("_transforms", {})
    if length not in cache:
      cache[length] = input_pipeline.ClipTransform(self.info, length, train=False, keys=self.keys,
                                                   normalization=self.normalization)
    return cache[length]

  def _run_model(self, examples: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    from avt_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    length = int(examples[0]["mask"].shape[0])
    padding = input_pipeline.zero_example(self.transform.geometry, length, self.keys)
    outs = []
    for i in range(0, len(examples), self.batch_size):
      chunk = list(examples[i:i + self.batch_size])
      n = len(chunk)
      chunk += [padding] * (self.batch_size - n)  # one compiled shape per window length
      batch = {k: np.stack([ex[k] for ex in chunk]) for k in self.keys}
      with self.setup.scope():
        out = np.asarray(self._apply(self.params, batch))
      outs.append(out[:n])
    return np.concatenate(outs).astype(np.float64)

  def window_examples(self, clip: extract_lib.RawClip, window: int = 0,
                      hop: int = 0) -> tuple[list[tuple[int, int]], list[dict[str, np.ndarray]]]:
    """The windows of an extracted clip and their model examples (normalised, padded to the window length)."""
    window, hop = window or self.window, hop or self.hop
    transform = self._transform(window)
    geo = transform.geometry
    ka, kv = geo.audio_frames, geo.visual_frames
    wins = windows(clip.num_tokens, window, hop)
    examples = []
    for start, length in wins:
      record = {"num_tokens": np.int32(length), "audio": clip.audio[start * ka:(start + length) * ka],
                "visual": clip.visual[start * kv:(start + length) * kv], "label": np.int32(-1),
                "targets": np.full((3,), np.nan, np.float32)}
      examples.append(transform(record))
    return wins, examples

  def window_rows(self, clip: extract_lib.RawClip, window: int = 0, hop: int = 0) -> list[dict[str, Any]]:
    """One JSON row per window: start_s, end_s, tokens and the probabilities (+ predicted) or values."""
    wins, examples = self.window_examples(clip, window, hop)
    out = self._run_model(examples)
    rate = self.extract_config.token_rate
    rows = []
    for (start, length), o in zip(wins, softmax(out) if self.task == "classification" else out):
      row = {"start_s": round(start / rate, 3), "end_s": round((start + length) / rate, 3), "tokens": int(length)}
      if self.task == "classification":
        row.update(probabilities={n: float(x) for n, x in zip(self.names, o)}, predicted=self.names[int(np.argmax(o))])
      else:
        row["values"] = {n: float(x) for n, x in zip(self.names, o)}
      rows.append(row)
    return rows

  def predict_clip(self, clip: extract_lib.RawClip, path: str = "", timeline: bool = False) -> dict[str, Any]:
    """The result for an extracted clip; with `timeline`, also the timeline curve's windows ("timeline")."""
    rows = self.window_rows(clip)
    key = "probabilities" if self.task == "classification" else "values"
    mean = np.mean([[r[key][n] for n in self.names] for r in rows], axis=0)
    clip_result = {key: {n: float(x) for n, x in zip(self.names, mean)}}
    if self.task == "classification":
      clip_result["predicted"] = self.names[int(np.argmax(mean))]
    rate = self.extract_config.token_rate
    result = {"video": path, "num_tokens": int(clip.num_tokens), "duration_s": round(clip.num_tokens / rate, 3),
              "face_detection_rate": clip.info.get("face_detection_rate"), "windows": rows, "clip": clip_result}
    if timeline:
      w, h = timeline_windows(clip.num_tokens, self.max_tokens, self.window_arg, self.hop_arg)
      same = windows(clip.num_tokens, w, h) == windows(clip.num_tokens, self.window, self.hop)
      result["timeline"] = {"window_tokens": w, "hop_tokens": h,
                            "windows": rows if same else self.window_rows(clip, w, h)}
    return result

  def predict(self, path: str, timeline: bool = False) -> dict[str, Any]:
    """Extracts and predicts one video; raises PredictError naming the file and the reason."""
    if not os.path.isfile(path):
      raise PredictError(f"{path}: no such file")
    try:
      clip = extract_lib.extract_raw(path, self.extract_config)
    except media_lib.ClipError as e:
      raise PredictError(clip_error_message(e)) from e
    return self.predict_clip(clip, path, timeline=timeline)

  def header(self) -> dict[str, Any]:
    out = {"workdir": self.workdir, "params": self.params_dir, "task": self.task, "window_tokens": self.window,
           "hop_tokens": self.hop, "token_rate": self.extract_config.token_rate}
    out["class_names" if self.task == "classification" else "target_names"] = list(self.names)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Timeline plot and the command line.
# ----------------------------------------------------------------------------------------------------------------


def timeline_figure(result: Mapping[str, Any], title: str = ""):
  """The matplotlib figure of a result's timeline curve (Predictor.predict(..., timeline=True))."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  curve = result["timeline"]
  rows = curve["windows"]
  key = "probabilities" if rows and "probabilities" in rows[0] else "values"
  names = list(rows[0][key]) if rows else []
  rate = result["num_tokens"] / result["duration_s"] if result.get("duration_s") else 5.0
  # Constrained layout makes room for the legend outside the axes, so it never hides the curves.
  fig, ax = plt.subplots(figsize=(9, 3.8), layout="constrained")
  centres = [(r["start_s"] + r["end_s"]) / 2 for r in rows]  # each window is drawn at its centre
  marker = "o" if len(rows) <= 40 else None
  for name in names:
    ax.plot(centres, [r[key][name] for r in rows], marker=marker, markersize=3, label=name, linewidth=1.8)
  ax.set_xlabel("time in the clip (s, window centre)")
  ax.set_ylabel("probability" if key == "probabilities" else "predicted value")
  ax.set_xlim(0, max(float(result.get("duration_s") or 0), centres[-1] if centres else 0) or 1)
  if key == "probabilities":
    ax.set_ylim(0, 1)
  where = title or os.path.basename(str(result.get("video", "")))
  detail = (f"curve: {curve['window_tokens'] / rate:g} s windows every {curve['hop_tokens'] / rate:g} s "
            f"({len(rows)} points)")
  clip = result.get("clip", {})
  if "predicted" in clip:
    detail += f"; clip-level result: {clip['predicted']} {clip['probabilities'][clip['predicted']]:.2f}"
  ax.set_title(f"{where}\n{detail}", fontsize="medium")
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small",
            title="class" if key == "probabilities" else "attribute")
  ax.grid(alpha=0.3)
  return fig


def write_timeline(result: Mapping[str, Any], path: str, title: str = "") -> str:
  """PNG of the timeline curve (probabilities or values over time), written atomically; returns the path."""
  import io  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = timeline_figure(result, title)
  buf = io.BytesIO()
  try:
    fig.savefig(buf, format="png", dpi=100)
  finally:
    plt.close(fig)
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    records.write_atomic(path, buf.getvalue())
  except OSError as e:
    raise PredictError(f"{path}: cannot write the timeline PNG ({e.strerror or e})") from e
  return path


def list_videos(path: str) -> list[str]:
  """The media files of a folder (recursive, sorted), or [path] for a file."""
  if os.path.isdir(path):
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                   if f.lower().endswith(media_lib.MEDIA_SUFFIXES))
    if not found:
      raise PredictError(f"{path}: folder has no media files ({', '.join(media_lib.MEDIA_SUFFIXES)})")
    return found
  if not os.path.exists(path):
    raise PredictError(f"{path}: no such file or folder")
  return [path]


def run(workdir: str, video: str, *, output: str = "", timeline: str = "", window_tokens: int = 0,
        hop_tokens: int = 0, dataset_info: str = "", batch_size: int = 8, err=None) -> tuple[dict[str, Any], int]:
  """Predicts every video; returns (the JSON document, exit status: 0, or 1 if any video failed)."""
  err = err or sys.stderr
  # Every path is made absolute once, here, so relative arguments work from any directory.
  workdir, video, output, timeline, dataset_info = map(config_lib.absolute_path, (workdir, video, output, timeline, dataset_info))
  videos = list_videos(video)
  predictor = Predictor(workdir, window_tokens=window_tokens, hop_tokens=hop_tokens, dataset_info=dataset_info,
                        batch_size=batch_size)
  folder = os.path.isdir(video)
  results, failed = [], 0
  for path in videos:
    try:
      result = predictor.predict(path, timeline=bool(timeline))
    except PredictError as e:
      print(f"error: {e}", file=err)
      results.append({"video": path, "error": str(e)})
      failed += 1
      continue
    if timeline:
      stem = os.path.splitext(os.path.relpath(path, video))[0].replace(os.sep, "_") if folder else ""
      png = os.path.join(timeline, stem + ".png") if folder else timeline
      try:
        result["timeline"]["png"] = write_timeline(result, png)
      except PredictError as e:  # the predictions stand; only the plot is missing
        print(f"error: {e}", file=err)
        result["timeline"]["error"] = str(e)
        failed += 1
    results.append(result)
  doc = {**predictor.header(), "videos": results}
  if output:
    try:
      os.makedirs(os.path.dirname(output), exist_ok=True)
      records.write_atomic(output, json.dumps(doc, indent=1) + "\n")
    except OSError as e:  # the predictions are still printed; a previous file stays as it was
      print(f"error: --output={output}: cannot write the predictions ({e.strerror or e})", file=err)
      failed += 1
  return doc, (1 if failed else 0)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m avt_jax.predict", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True,
                      help="Fine-tuning run directory (config.json and a checkpoint in best/ or checkpoints/).")
  parser.add_argument("--video", required=True, help="A media file, or a folder searched recursively.")
  parser.add_argument("--output", default="", help="Also write the JSON here.")
  parser.add_argument("--timeline", default="",
                      help="PNG of the probabilities / values over time (a directory when --video is a folder). "
                           "Its windows are chosen per clip: data.max_tokens, shortened on short clips so that at "
                           "least 8 windows fit (never below 2 tokens), hop 1 token (more on long clips: at most "
                           "200 points); --window_tokens / --hop_tokens replace them when given.")
  parser.add_argument("--window_tokens", type=int, default=0,
                      help="Window length in tokens, 5 per second (0: data.max_tokens; for --timeline: see there).")
  parser.add_argument("--hop_tokens", type=int, default=0,
                      help="Window start spacing in tokens (0: the window length; for --timeline: see there).")
  parser.add_argument("--dataset_info", default="",
                      help="Training data's prepared dir or dataset_info.json (default: from the run's config).")
  parser.add_argument("--batch_size", type=int, default=8, help="Windows per model call.")
  args = parser.parse_args(argv)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)  # checkpoint-library chatter would bury the result
  try:
    doc, status = run(args.workdir, args.video, output=args.output, timeline=args.timeline,
                      window_tokens=args.window_tokens, hop_tokens=args.hop_tokens, dataset_info=args.dataset_info,
                      batch_size=args.batch_size)
  except PredictError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(doc, indent=1))
  return status


if __name__ == "__main__":
  sys.exit(main())
