"""From one media file to the arrays of one clip record on the common token grid.

Time alignment: both streams carry presentation timestamps on the container clock. The clip starts at
`origin = max(first audio sample, first video frame)` and lasts
`min(audio end, video end) - origin`, where a video frame is shown for one frame period after its timestamp
(CREMA-D's FLV audio runs ~37 ms past its video, so the video end decides there).
`num_tokens = floor(duration * token_rate)`; clips with fewer than `min_tokens` tokens are skipped.

  * video: output frame j (j < num_tokens * Kv, Kv = fps / token_rate) is the source frame whose timestamp is
    nearest `origin + j / fps` (29.97 fps CREMA-D becomes 25 fps; 25 fps GRID maps one to one), then the face
    crop of that frame (data.face);
  * audio: mono 16 kHz from `origin` on, log-mel with 10 ms hop (data.logmel); mel frame k is centred at
    `origin + k * 10 ms`, so token t owns frames [t * Ka, (t + 1) * Ka) with Ka = 20.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import numpy as np

from avt_jax import targets as targets_lib
from data import face as face_lib
from data import logmel as logmel_lib
from data import media as media_lib
from data.media import ClipError


class TooShortError(ClipError):
  """The clip has fewer tokens than the configured minimum."""


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
  token_rate: float = 5.0  # tokens per second
  fps: float = 25.0  # video frame rate after resampling
  min_tokens: int = 1  # shorter clips are skipped
  target_size: int = 8  # side of the grayscale reconstruction-target patch (statistics only)
  max_short_side: int = 480  # larger videos are scaled down to this short side while decoding (memory bound)
  logmel: logmel_lib.LogMelConfig = logmel_lib.LogMelConfig()
  face: face_lib.FaceConfig = face_lib.FaceConfig()

  def __post_init__(self):
    _ = self.video_frames_per_token, self.audio_frames_per_token
    if self.face.size % self.target_size:
      raise ValueError(f"face size {self.face.size} must be a multiple of target_size {self.target_size}")

  @property
  def video_frames_per_token(self) -> int:
    return _as_int(self.fps / self.token_rate, f"fps / token_rate = {self.fps} / {self.token_rate}")

  @property
  def audio_frames_per_token(self) -> int:
    rate = self.logmel.sample_rate / self.logmel.hop_length
    return _as_int(rate / self.token_rate, f"sample_rate / hop_length / token_rate = {rate} / {self.token_rate}")

  def to_dict(self) -> dict[str, Any]:
    return dict(token_rate=self.token_rate, fps=self.fps, min_tokens=self.min_tokens, target_size=self.target_size,
                max_short_side=self.max_short_side, logmel=self.logmel.to_dict(), face=self.face.to_dict())

  @classmethod
  def from_info(cls, info: Mapping[str, Any]) -> "ExtractConfig":
    """The config that produced a raw-kind dataset (data.prepare writes every parameter into its info)."""
    if info.get("kind") != "raw":
      raise ValueError(f"kind={info.get('kind')!r} data holds precomputed features, not raw log-mel + face clips")
    a, v = info["audio"], info["visual"]
    ext = info.get("extractors", {})
    lm_fields = {f.name for f in dataclasses.fields(logmel_lib.LogMelConfig)}
    logmel = logmel_lib.LogMelConfig(**{k: a[k] for k in lm_fields if k in a})
    face = dataclasses.replace(face_lib.FaceConfig.from_dict(ext.get("face", {})), size=int(v["size"]))
    config = cls(token_rate=float(info["token_rate"]), fps=float(v["fps"]), min_tokens=1,
                 target_size=int(v.get("target_size", 8)),
                 max_short_side=int(ext.get("decode_max_short_side", cls.max_short_side)), logmel=logmel, face=face)
    if (config.audio_frames_per_token, config.video_frames_per_token) != (int(a["frames_per_token"]),
                                                                           int(v["frames_per_token"])):
      raise ValueError(f"frames per token (audio {a['frames_per_token']}, visual {v['frames_per_token']}) do not "
                       f"follow from its own parameters")
    return config


def _as_int(x: float, what: str) -> int:
  if abs(x - round(x)) > 1e-9 or round(x) < 1:
    raise ValueError(f"{what} = {x} must be a positive integer")
  return int(round(x))


@dataclasses.dataclass
class RawClip:
  num_tokens: int
  audio: np.ndarray  # float32 [T * Ka, n_mels]
  visual: np.ndarray  # uint8 [T * Kv, S, S, 3]
  info: dict[str, Any]  # durations, frame counts, face-track statistics (JSON-able)


def num_tokens_for(duration: float, token_rate: float) -> int:
  # The small epsilon keeps exact multiples (3.0 s * 5 = 15) from flooring to 14 through rounding noise.
  return max(0, int(math.floor(duration * token_rate + 1e-6)))


def extract_raw(path: str, config: ExtractConfig = ExtractConfig()) -> RawClip:
  """Decodes `path` and returns its log-mel frames and face crops on the token grid (raises ClipError)."""
  m = media_lib.decode_media(path, sample_rate=config.logmel.sample_rate, max_short_side=config.max_short_side)
  origin = max(m.audio_start, m.video_start)
  audio_dur = m.audio_end - origin
  video_dur = m.video_end - origin
  n = num_tokens_for(min(audio_dur, video_dur), config.token_rate)
  if n < max(1, config.min_tokens):
    raise TooShortError(path, f"too short: {min(audio_dur, video_dur):.3f} s gives {n} tokens "
                              f"(minimum {max(1, config.min_tokens)})")
  kv, ka = config.video_frames_per_token, config.audio_frames_per_token
  targets = origin + np.arange(n * kv) / config.fps
  index = media_lib.nearest_frame_indices(m.frame_times, targets)
  identity = len(index) == m.num_frames and np.array_equal(index, np.arange(len(index)))
  crops, track = face_lib.face_crops(m.frames if identity else m.frames[index], config.face, path)

  offset = int(round((origin - m.audio_start) * config.logmel.sample_rate))
  mel = logmel_lib.log_mel(m.audio[offset:], config.logmel)
  if mel.shape[0] < n * ka:  # cannot happen when audio_dur >= n / token_rate; guards rounding of the offset
    mel = np.concatenate([mel, np.repeat(mel[-1:], n * ka - mel.shape[0], 0)])
  mel = mel[:n * ka]
  info = dict(
      audio_duration=round(m.audio_duration, 6), video_duration=round(m.video_duration, 6),
      aligned_duration=round(min(audio_dur, video_dur), 6), av_offset=round(m.video_start - m.audio_start, 6),
      source_video_frames=m.num_frames, source_fps=round(1.0 / m.frame_period, 4) if m.frame_period else 0.0,
      source_audio_samples=m.source_num_samples, source_sample_rate=m.source_sample_rate,
      source_channels=m.source_channels, source_audio_peak=round(m.source_peak, 4),
      video_codec=m.info.video_codec, audio_codec=m.info.audio_codec, width=m.info.width, height=m.info.height,
      video_frames=int(n * kv), audio_frames=int(n * ka), num_tokens=int(n),
      **track.summary())
  return RawClip(num_tokens=n, audio=mel, visual=crops, info=info)


def clip_statistics(audio: np.ndarray, visual: np.ndarray | None = None, frames_per_token: int = 5,
                    target_size: int = 8) -> dict[str, Any]:
  """Sums for dataset statistics (float64): per-column audio sums, and visual-target sums (raw kind) or per-column
  visual sums (features kind)."""
  a = audio.astype(np.float64)
  stats = dict(clip_count=1, audio_count=int(a.shape[0]), audio_sum=a.sum(0).tolist(), audio_sumsq=(a * a).sum(0).tolist())
  if visual is not None and visual.dtype == np.uint8:
    n, size = visual.shape[0] // frames_per_token, visual.shape[1]
    v = targets_lib.face_target(visual.reshape(n, frames_per_token, size, size, 3), target_size).astype(np.float64)
    stats.update(visual_count=int(v.size), visual_sum=[float(v.sum())], visual_sumsq=[float((v * v).sum())])
  elif visual is not None:
    v = visual.astype(np.float64)
    stats.update(visual_count=int(v.shape[0]), visual_sum=v.sum(0).tolist(), visual_sumsq=(v * v).sum(0).tolist())
  return stats


def merge_statistics(clip_stats: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """Sums per-clip statistics (counts and float64 sums) in iteration order; associative, so Beam can combine."""
  out: dict[str, Any] = {}
  for s in clip_stats:
    for k, v in s.items():
      if k.endswith("_count"):
        out[k] = out.get(k, 0) + int(v)
      elif k in out:
        out[k] = (np.asarray(out[k], np.float64) + np.asarray(v, np.float64)).tolist()
      else:
        out[k] = list(v)
  return out


def mean_std(merged: dict[str, Any], prefix: str) -> tuple[np.ndarray, np.ndarray, int]:
  """Mean and std (float64) of `prefix` ("audio" or "visual") from merged statistics."""
  count = merged.get(prefix + "_count", 0)
  if count == 0:
    return np.zeros(0), np.zeros(0), 0
  mean = np.asarray(merged[prefix + "_sum"], np.float64) / count
  var = np.maximum(np.asarray(merged[prefix + "_sumsq"], np.float64) / count - mean * mean, 0.0)
  return mean, np.sqrt(var), count
