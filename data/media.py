"""Decoding talking-face media files with PyAV.

`decode_media` returns the RGB video frames with their presentation timestamps and the audio as mono float32 at
16 kHz in [-1, 1]. Streams are selected explicitly (FLV files also carry a data stream). Decoder and demuxer
complaints (truncated or damaged packets) are captured from FFmpeg's log and turn into `CorruptMediaError`, so a
half-written file is reported instead of silently yielding a short clip.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import av
import numpy as np

# File suffixes treated as media when a directory is scanned.
VIDEO_SUFFIXES = (".mp4", ".flv", ".mpg", ".mpeg", ".avi", ".mkv", ".mov", ".webm", ".m4v")
AUDIO_SUFFIXES = (".mp3", ".wav", ".flac", ".m4a", ".aac", ".ogg", ".opus")
MEDIA_SUFFIXES = VIDEO_SUFFIXES + AUDIO_SUFFIXES

AUDIO_ONLY_REASON = "no video stream (audio-only file)"


class ClipError(ValueError):
  """A clip cannot be turned into a record. `path` names the file, `reason` says why (short, for manifests)."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = path
    self.reason = reason


class CorruptMediaError(ClipError):
  """The file cannot be opened, is not a media file, or is truncated/damaged."""


class NoVideoStreamError(ClipError):
  """The file has no video stream (e.g. an audio-only CREMA-D .mp3)."""


class NoAudioStreamError(ClipError):
  """The file has no audio stream."""


@dataclasses.dataclass
class StreamInfo:
  """What the container declares, read without decoding."""
  path: str
  has_video: bool
  has_audio: bool
  video_codec: str = ""
  audio_codec: str = ""
  width: int = 0
  height: int = 0
  average_rate: float = 0.0
  audio_rate: int = 0
  audio_channels: int = 0
  container_duration: float = 0.0  # seconds; 0 if unknown


@dataclasses.dataclass
class Media:
  """A decoded clip. Times are in seconds on the container's clock."""
  path: str
  frames: np.ndarray  # uint8 [N, H, W, 3] RGB
  frame_times: np.ndarray  # float64 [N], presentation time of each frame
  frame_period: float  # seconds per source frame (from the timestamps; 1/average_rate for one frame)
  audio: np.ndarray  # float32 [M] mono at `sample_rate`, in [-1, 1]
  sample_rate: int
  audio_start: float  # time of the first audio sample
  source_sample_rate: int
  source_num_samples: int  # decoded samples per channel at the source rate
  source_channels: int
  source_peak: float  # largest |sample| after downmixing, before resampling/clipping
  info: StreamInfo

  @property
  def num_frames(self) -> int:
    return int(self.frames.shape[0])

  @property
  def video_start(self) -> float:
    return float(self.frame_times[0])

  @property
  def video_end(self) -> float:
    return float(self.frame_times[-1]) + self.frame_period

  @property
  def video_duration(self) -> float:
    return self.video_end - self.video_start

  @property
  def audio_duration(self) -> float:
    return self.source_num_samples / self.source_sample_rate

  @property
  def audio_end(self) -> float:
    return self.audio_start + self.audio_duration


def _open(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such media file")
  try:
    return av.open(path)
  except av.FFmpegError as e:
    raise CorruptMediaError(path, f"unreadable media file ({type(e).__name__}: {_short(e)})") from e


def _short(e: BaseException) -> str:
  return str(e).splitlines()[0][:200]


def _streams(container):
  video = [s for s in container.streams if s.type == "video"]
  audio = [s for s in container.streams if s.type == "audio"]
  return (video[0] if video else None), (audio[0] if audio else None)


def _stream_info(path: str, c) -> StreamInfo:
  v, a = _streams(c)
  info = StreamInfo(path=path, has_video=v is not None, has_audio=a is not None,
                    container_duration=(c.duration or 0) / 1e6)
  if v is not None:
    info.video_codec = v.codec_context.name
    info.width, info.height = v.codec_context.width, v.codec_context.height
    rate = v.average_rate or v.guessed_rate
    info.average_rate = float(rate) if rate else 0.0
  if a is not None:
    info.audio_codec = a.codec_context.name
    info.audio_rate = int(a.codec_context.sample_rate or a.rate or 0)
    info.audio_channels = int(a.codec_context.channels)
  return info


# Scale of integer sample formats (planar or packed) to [-1, 1).
_INT_SCALE = {"s16": 32768.0, "s32": 2.0 ** 31, "s64": 2.0 ** 63}


def _audio_to_float(frame: "av.AudioFrame", path: str) -> np.ndarray:
  """Returns float64 [channels, samples] in the decoder's nominal [-1, 1] range."""
  fmt = frame.format.name
  x = frame.to_ndarray()
  channels = len(frame.layout.channels)
  if not frame.format.is_planar:
    x = x.reshape(-1, channels).T
  base = fmt.rstrip("p")
  if base in ("flt", "dbl"):
    return x.astype(np.float64)
  if base in _INT_SCALE:
    return x.astype(np.float64) / _INT_SCALE[base]
  if base == "u8":
    return (x.astype(np.float64) - 128.0) / 128.0
  raise CorruptMediaError(path, f"unsupported audio sample format {fmt!r}")


def resample_audio(x: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
  """Polyphase resampling (scipy.signal.resample_poly, Kaiser window) of a 1-D float64 signal."""
  if orig_rate == new_rate:
    return x
  # Imported here: scipy.signal takes 1.6 s to import, paid by every preparation worker, and 16 kHz audio
  # (VoxCeleb2's) never needs it.
  from scipy import signal  # pylint: disable=import-outside-toplevel
  g = math.gcd(orig_rate, new_rate)
  return signal.resample_poly(x, new_rate // g, orig_rate // g)


def decode_media(path: str, sample_rate: int = 16000, need_video: bool = True,
                 check_integrity: bool = True, max_short_side: int = 0) -> Media:
  """Decodes video (RGB uint8) and audio (mono float32 at `sample_rate`, clipped to [-1, 1]).

  `max_short_side` > 0 scales larger frames down (area interpolation, aspect kept) while decoding, which bounds
  memory for high-resolution sources; smaller frames are left untouched.

  Raises NoVideoStreamError / NoAudioStreamError when a stream is missing (no video is only an error when
  `need_video`), CorruptMediaError when the file is unreadable, truncated or damaged.
  """
  with _open(path) as c:
    info = _stream_info(path, c)
    vstream, astream = _streams(c)
    if vstream is None and need_video:
      raise NoVideoStreamError(path, AUDIO_ONLY_REASON)
    if astream is None:
      raise NoAudioStreamError(path, "no audio stream")
    selected = [s for s in (vstream, astream) if s is not None]
    for s in selected:
      # Decode in the calling thread: FFmpeg's messages from decoder threads would escape the log capture below,
      # and parallelism comes from worker processes.
      s.codec_context.thread_count = 1
    size = {}
    short = min(info.width, info.height)
    if vstream is not None and max_short_side and short > max_short_side:
      scale = max_short_side / short
      size = dict(width=2 * round(info.width * scale / 2), height=2 * round(info.height * scale / 2),
                  interpolation="AREA")
    frames, times, chunks, atimes = [], [], [], []
    old_level = av.logging.get_level()
    av.logging.set_level(av.logging.WARNING)
    try:
      with av.logging.Capture(True) as logs:
        try:
          for frame in c.decode(*selected):
            if isinstance(frame, av.VideoFrame):
              if size:
                frame = frame.reformat(format="rgb24", **size)
              frames.append(frame.to_ndarray(format="rgb24"))
              times.append(frame.time)
            else:
              chunks.append(_audio_to_float(frame, path))
              atimes.append(frame.time)
        except av.FFmpegError as e:
          raise CorruptMediaError(path, f"decoding failed, file truncated or damaged ({_short(e)})") from e
    finally:
      av.logging.set_level(old_level)
  if check_integrity:
    problems = [m.strip() for level, _, m in logs
                if level <= av.logging.ERROR or "corrupt" in m.lower() or "truncat" in m.lower()]
    if problems:
      raise CorruptMediaError(path, f"file truncated or damaged (decoder: {problems[0]})")
  if not chunks:
    raise CorruptMediaError(path, "audio stream decodes to no samples")
  if need_video and not frames:
    raise CorruptMediaError(path, "video stream decodes to no frames")

  source_rate = info.audio_rate or chunks[0].shape[1]
  mono = np.concatenate([ch.mean(axis=0) for ch in chunks])
  source_peak = float(np.abs(mono).max()) if mono.size else 0.0
  audio = np.clip(resample_audio(mono, source_rate, sample_rate), -1.0, 1.0).astype(np.float32)
  audio_start = float(atimes[0]) if atimes[0] is not None else 0.0

  if frames:
    frame_array = np.stack(frames)
    frame_times = _fill_times(times, info.average_rate)
    if len(frame_times) > 1:
      period = float(frame_times[-1] - frame_times[0]) / (len(frame_times) - 1)
    else:
      period = 1.0 / info.average_rate if info.average_rate else 0.04
  else:
    frame_array = np.zeros((0, 0, 0, 3), np.uint8)
    frame_times = np.zeros((0,), np.float64)
    period = 0.0
  if check_integrity and frames and info.container_duration > 0:
    decoded_end = max(frame_times[-1] + period, audio_start + mono.size / source_rate)
    if decoded_end < 0.9 * info.container_duration - 0.1:
      raise CorruptMediaError(path, f"file truncated: decodes to {decoded_end:.2f} s but the container declares "
                                    f"{info.container_duration:.2f} s")
  return Media(path=path, frames=frame_array, frame_times=frame_times, frame_period=period, audio=audio,
               sample_rate=sample_rate, audio_start=audio_start, source_sample_rate=source_rate,
               source_num_samples=int(mono.size), source_channels=info.audio_channels, source_peak=source_peak,
               info=info)


def _fill_times(times: Sequence[float | None], rate: float) -> np.ndarray:
  """Frame timestamps in seconds; frames without a timestamp continue from the previous one at `rate`."""
  step = 1.0 / rate if rate else 0.04
  out = np.zeros(len(times), np.float64)
  for i, t in enumerate(times):
    if t is None:
      out[i] = out[i - 1] + step if i else 0.0
    else:
      out[i] = float(t)
  return out


def nearest_frame_indices(frame_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Index of the frame whose timestamp is nearest each target time (ties go to the earlier frame)."""
  frame_times = np.asarray(frame_times, np.float64)
  targets = np.asarray(targets, np.float64)
  if frame_times.size == 0:
    raise ValueError("no frames to pick from")
  if np.any(np.diff(frame_times) < 0):
    order = np.argsort(frame_times, kind="stable")
    return order[nearest_frame_indices(frame_times[order], targets)]
  right = np.clip(np.searchsorted(frame_times, targets, side="left"), 0, frame_times.size - 1)
  left = np.clip(right - 1, 0, frame_times.size - 1)
  pick_left = np.abs(targets - frame_times[left]) <= np.abs(frame_times[right] - targets)
  return np.where(pick_left, left, right)


def libav_versions() -> str:
  """PyAV and FFmpeg library versions, for manifests."""
  lib = av.library_versions.get("libavcodec", ())
  return f"pyav {av.__version__}, libavcodec {'.'.join(map(str, lib))}"

