"""Log-mel filterbank features in numpy.

Conventions match `librosa.feature.melspectrogram(y, sr, n_fft, hop_length, win_length, window="hann",
center=True, pad_mode="constant", power=2.0, n_mels, fmin, fmax, htk=False, norm="slaney")` followed by
`log(mel + 1e-6)`: periodic Hann window, frames centred on multiples of `hop_length` (the signal is zero-padded
by n_fft // 2 on both sides), power spectrum, Slaney mel scale (linear below 1 kHz, logarithmic above) with
Slaney area normalisation of each triangle. Frame k therefore covers the audio around k * hop_length / sr seconds,
and with hop 160 at 16 kHz 20 consecutive frames make one 200 ms token.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

LOG_OFFSET = 1e-6


@dataclasses.dataclass(frozen=True)
class LogMelConfig:
  sample_rate: int = 16000
  n_fft: int = 400
  win_length: int = 400
  hop_length: int = 160
  n_mels: int = 80
  fmin: float = 0.0
  fmax: float = 8000.0

  def to_dict(self) -> dict:
    return dict(type="logmel", sample_rate=self.sample_rate, n_fft=self.n_fft, win_length=self.win_length,
                hop_length=self.hop_length, n_mels=self.n_mels, fmin=self.fmin, fmax=self.fmax,
                window="hann (periodic)", center=True, pad_mode="constant", power=2.0, mel_scale="slaney",
                mel_norm="slaney", log_offset=LOG_OFFSET)


# Slaney mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(f: np.ndarray) -> np.ndarray:
  f = np.asarray(f, np.float64)
  lin = f / _F_SP
  log = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
  return np.where(f >= _MIN_LOG_HZ, log, lin)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
  m = np.asarray(m, np.float64)
  lin = m * _F_SP
  log = _MIN_LOG_HZ * np.exp(_LOG_STEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
  return np.where(m >= _MIN_LOG_MEL, log, lin)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
  """Triangular filters [n_mels, n_fft // 2 + 1] (float64), each scaled to unit area (2 / bandwidth)."""
  fft_hz = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
  edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  widths = np.diff(edges_hz)
  weights = np.zeros((n_mels, fft_hz.size))
  for i in range(n_mels):
    rising = (fft_hz - edges_hz[i]) / widths[i]
    falling = (edges_hz[i + 2] - fft_hz) / widths[i + 1]
    weights[i] = np.maximum(0.0, np.minimum(rising, falling))
  weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
  weights.setflags(write=False)
  return weights


@functools.lru_cache(maxsize=8)
def _window(n_fft: int, win_length: int) -> np.ndarray:
  n = np.arange(win_length)
  w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)  # periodic Hann
  left = (n_fft - win_length) // 2
  out = np.zeros(n_fft)
  out[left:left + win_length] = w
  out.setflags(write=False)
  return out


def num_frames(num_samples: int, hop_length: int = 160) -> int:
  """Frames produced for a signal of `num_samples` (centred framing)."""
  return 1 + num_samples // hop_length


def power_mel(audio: np.ndarray, config: LogMelConfig = LogMelConfig()) -> np.ndarray:
  """Mel power spectrogram [frames, n_mels] (float64) of a mono signal."""
  x = np.asarray(audio, np.float64)
  if x.ndim != 1:
    raise ValueError(f"expected mono audio of shape [samples], got shape {x.shape}")
  c = config
  pad = c.n_fft // 2
  x = np.pad(x, (pad, pad))
  n = 1 + (x.size - c.n_fft) // c.hop_length
  frames = np.lib.stride_tricks.sliding_window_view(x, c.n_fft)[::c.hop_length][:n]
  spec = np.fft.rfft(frames * _window(c.n_fft, c.win_length), axis=-1)
  power = spec.real ** 2 + spec.imag ** 2
  return power @ mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.fmin, c.fmax).T


def log_mel(audio: np.ndarray, config: LogMelConfig = LogMelConfig()) -> np.ndarray:
  """log(mel power + 1e-6) as float32 [frames, n_mels], frames = 1 + len(audio) // hop_length."""
  return np.log(power_mel(audio, config) + LOG_OFFSET).astype(np.float32)
