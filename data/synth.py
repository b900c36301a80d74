r"""avt_synth: a small synthetic audio-visual emotion benchmark (features kind, 5 tokens per second).

  python -m data.synth --output=sample/avt_synth [--num_speakers=20 --clips_per_speaker=30
      --pretrain_speakers=40 --pretrain_clips_per_speaker=25 --seed=0]
  python -m data.synth --version=2 --output=<dir> [--seed=0]      # v2, "nonlinear views" (below)

Two versions. v1 (the default, committed as sample/avt_synth) is the control: its label is close to linear in the
clip means of the inputs, so a linear model on clip means already does well and pretraining has little to add.
v2 observes the same latent through strongly nonlinear maps, so that clip statistics of the raw inputs say little
about the label while the latent (which masked-frame reconstruction has to infer) says nearly everything.

Output (docs/data_format.md):
  <output>/                  the labelled part: `num_speakers` speakers (synth_s00, ...), 6 classes, arousal and
                             valence in [1, 5]; folds in data/folds/avt_synth.json
  <output>/pretrain/         the unlabelled pool: `pretrain_speakers` other speakers (synthpre_s00, ...), label -1,
                             targets NaN; used for self-supervised pretraining only
Each part is a prepared directory (dataset_info.json, manifest.jsonl, shards/). Both parts carry the same
normalisation statistics (per-dimension mean / std of the unlabelled pool). The files are byte-identical for the
same arguments.

Generative process (all random draws from one numpy Generator seeded with --seed, in a fixed order):

World (shared by every clip):
  * six class prototypes p_c = R (cos(2 pi c / 6), sin(2 pi c / 6)), R = 1, c = 0..5, in the plane of the
    slow latent components (z0 ~ "arousal", z1 ~ "valence"), like an emotion circumplex;
  * per modality m in {audio (32-d), visual (17-d)} a fixed random map x = tanh(W_m z + b_m), W_m with N(0, 1)
    entries, b_m ~ N(0, 0.3^2). Audio sees z1 only weakly (its column scaled by 0.2), visual sees z0 only weakly,
    so a clip's class (which needs both z0 and z1) needs both modalities.

Speaker (each speaker, labelled or not): an additive offset o ~ N(0, 0.3^2) and a gain g = exp(N(0, 0.15^2)) per
  output dimension and modality (speaker "style", a nuisance that speaker-independent folds test).

Clip of T tokens, T uniform in [min_tokens, max_tokens] (8..16 = 1.6-3.2 s):
  * a drawn class c (uniform) and a clip level mu = p_c + N(0, 0.25^2 I) in (z0, z1);
  * z0, z1: mu + an AR(1) process a_t = 0.6 a_(t-1) + 0.8 * 0.6 e_t (stationary std 0.6, e_t ~ N(0, 1));
  * z2, z3: a shared "rhythm", cos / sin(omega t + phi) with omega ~ U(0.8, 2.0) rad per token, phi ~ U(0, 2 pi);
  * observations x_m,t = g_m * tanh(W_m z_t + b_m) + o_m + N(0, 0.3^2) per dimension.
Labels come from the realised clip-level statistics of the latent, not from the drawn class:
  * label = the prototype nearest to the time mean of (z0, z1) over the clip (so a model must integrate over time,
    and over both modalities; chance accuracy 1/6, classes close to balanced);
  * arousal = 3 + 2 tanh(mean_t z0 + N(0, 0.1^2)), valence = 3 + 2 tanh(mean_t z1 + N(0, 0.1^2)) (in [1, 5]);
    dominance is NaN (unknown).

v2 ("nonlinear views"; dataset name avt_synth_v2): the same latent, speakers and labels, with
  * observations x_m,t = g_m * sin(3 * W_m z_t + b_m) + o_m + N(0, 0.3^2), W_m with N(0, 1) entries (the weak
    column scaled by 0.2 as in v1), b_m ~ U(0, 2 pi): every input dimension is a folded, many-to-one view of the
    latent, so clip means and stds of the inputs are weak features of the label;
  * fixed clip length T = 16; defaults 30 labelled speakers x 24 clips, an unlabelled pool of 150 other speakers x
    20 clips (<output>/pretrain) and 10 further pool speakers x 20 clips for pretraining validation
    (<output>/pretrain_val, labelled: the held-out reconstruction gate and the linear probe use them; they are
    disjoint from the labelled speakers, so no fine-tuning test speaker is seen while pretraining).
  Random draws in this order: world, labelled part, pool, pool validation part.

Why pretraining can help: reconstructing masked frames of one modality needs the slow level (z0, z1) of the clip
and the rhythm phase, i.e. the same clip-level statistics that decide the labels, and the unlabelled pool is much
larger than a fold's labelled training set (1000 clips vs 390 labelled training clips, 39 at 10% labels).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np

from avt_jax import records

DATASET = "avt_synth"
TOKEN_RATE = 5.0
AUDIO_DIM = 32
VISUAL_DIM = 17
LATENT_DIM = 4
NUM_CLASSES = 6
CLASS_NAMES = tuple(f"c{k}" for k in range(NUM_CLASSES))
SHARD = "shards/clips-00000-of-00001.array_record"

# Process constants (see the module docstring).
PROTOTYPE_RADIUS = 1.0
LEVEL_JITTER = 0.25
AR_COEF = 0.6
AR_STD = 0.6
OMEGA_RANGE = (0.8, 2.0)
CROSS_WEIGHT = 0.2
BIAS_STD = 0.3
OFFSET_STD = 0.3
GAIN_LOG_STD = 0.15
NOISE_STD = 0.3
RATING_NOISE = 0.1
SIN_SCALE = 3.0           # v2: x = g sin(SIN_SCALE * W z + b) + o + noise

LATENT_KEYS = ("latent_level",)  # In simulate()'s clips, not in the written records.

VERSIONS = (1, 2)
DATASETS = {1: DATASET, 2: "avt_synth_v2"}
# Sizes per version (the flags' defaults); validation_speakers: the labelled pool-validation part (v2).
DEFAULTS = {
    1: dict(num_speakers=20, clips_per_speaker=30, pretrain_speakers=40, pretrain_clips_per_speaker=25,
            validation_speakers=0, min_tokens=8, max_tokens=16),
    2: dict(num_speakers=30, clips_per_speaker=24, pretrain_speakers=150, pretrain_clips_per_speaker=20,
            validation_speakers=10, min_tokens=16, max_tokens=16),
}


def prototypes() -> np.ndarray:
  """[6, 2] class prototypes in the (z0, z1) plane."""
  ang = 2 * np.pi * np.arange(NUM_CLASSES) / NUM_CLASSES
  return PROTOTYPE_RADIUS * np.stack([np.cos(ang), np.sin(ang)], axis=1)


def make_world(rng: np.random.Generator, version: int = 1) -> dict[str, np.ndarray]:
  """The fixed observation maps of both modalities."""
  world = {"version": version}
  for name, dim, weak in (("audio", AUDIO_DIM, 1), ("visual", VISUAL_DIM, 0)):
    w = rng.normal(size=(dim, LATENT_DIM))
    w[:, weak] *= CROSS_WEIGHT
    world[f"{name}_w"] = w
    if version == 1:
      world[f"{name}_b"] = rng.normal(scale=BIAS_STD, size=(dim,))
    else:
      world[f"{name}_b"] = rng.uniform(0.0, 2 * np.pi, size=(dim,))
  return world


def make_speaker(rng: np.random.Generator) -> dict[str, np.ndarray]:
  style = {}
  for name, dim in (("audio", AUDIO_DIM), ("visual", VISUAL_DIM)):
    style[f"{name}_offset"] = rng.normal(scale=OFFSET_STD, size=(dim,))
    style[f"{name}_gain"] = np.exp(rng.normal(scale=GAIN_LOG_STD, size=(dim,)))
  return style


def latent_trajectory(rng: np.random.Generator, num_tokens: int, cls: int) -> np.ndarray:
  """[T, 4] latent of one clip of class `cls` (the drawn class; the label is decided later from the realisation)."""
  mu = prototypes()[cls] + rng.normal(scale=LEVEL_JITTER, size=(2,))
  innov = rng.normal(size=(num_tokens, 2)) * AR_STD * math.sqrt(1 - AR_COEF ** 2)
  a = np.zeros((num_tokens, 2))
  a[0] = rng.normal(scale=AR_STD, size=(2,))
  for t in range(1, num_tokens):
    a[t] = AR_COEF * a[t - 1] + innov[t]
  omega = rng.uniform(*OMEGA_RANGE)
  phase = rng.uniform(0, 2 * np.pi)
  t = np.arange(num_tokens)
  rhythm = np.stack([np.cos(omega * t + phase), np.sin(omega * t + phase)], axis=1)
  return np.concatenate([mu + a, rhythm], axis=1)


def observe(rng: np.random.Generator, z: np.ndarray, world: dict, style: dict, name: str) -> np.ndarray:
  if world["version"] == 1:
    clean = np.tanh(z @ world[f"{name}_w"].T + world[f"{name}_b"])
  else:
    clean = np.sin(SIN_SCALE * (z @ world[f"{name}_w"].T) + world[f"{name}_b"])
  x = style[f"{name}_gain"] * clean + style[f"{name}_offset"]
  return (x + rng.normal(scale=NOISE_STD, size=x.shape)).astype(np.float32)


def clip_labels(rng: np.random.Generator, z: np.ndarray) -> tuple[int, np.ndarray]:
  """(class label, [arousal, valence, NaN]) from the clip-level statistics of the latent."""
  level = z[:, :2].mean(axis=0)
  label = int(np.argmin(((prototypes() - level) ** 2).sum(axis=1)))
  noise = rng.normal(scale=RATING_NOISE, size=(2,))
  av = 3.0 + 2.0 * np.tanh(level + noise)
  return label, np.array([av[0], av[1], np.nan], np.float32)


def generate_part(rng: np.random.Generator, world: dict, prefix: str, num_speakers: int, clips_per_speaker: int,
                  labelled: bool, min_tokens: int, max_tokens: int,
                  dataset: str = DATASET) -> list[dict[str, Any]]:
  """Clip records of one part, speaker by speaker (clip ids sort in generation order)."""
  out = []
  for s in range(num_speakers):
    speaker = f"{prefix}_s{s:02d}"
    style = make_speaker(rng)
    for k in range(clips_per_speaker):
      num_tokens = int(rng.integers(min_tokens, max_tokens + 1))
      cls = int(rng.integers(NUM_CLASSES))
      z = latent_trajectory(rng, num_tokens, cls)
      audio = observe(rng, z, world, style, "audio")
      visual = observe(rng, z, world, style, "visual")
      label, targets = clip_labels(rng, z)
      if not labelled:
        label, targets = -1, np.full((3,), np.nan, np.float32)
      out.append(dict(clip_id=f"{speaker}_c{k:03d}", dataset=dataset, speaker=speaker, session="",
                      label=np.int32(label), targets=targets, num_tokens=np.int32(num_tokens),
                      audio=audio, visual=visual, latent_level=z[:, :2].mean(axis=0)))
  return out


def _stats(clips: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
  x = np.concatenate([c[key] for c in clips]).astype(np.float64)
  return [round(float(v), 6) for v in x.mean(0)], [round(float(v), 6) for v in x.std(0)]


def manifest_row(clip: dict) -> dict[str, Any]:
  targets = [None if math.isnan(float(t)) else round(float(t), 6) for t in clip["targets"]]
  return {"clip_id": clip["clip_id"], "status": "ok", "dataset": clip["dataset"], "speaker": clip["speaker"],
          "session": clip["session"], "label": int(clip["label"]), "targets": targets,
          "num_tokens": int(clip["num_tokens"])}


def write_part(directory: str, clips: Sequence[dict], stats: dict, description: str, generator: dict) -> None:
  """Writes one prepared directory (shard, manifest.jsonl, dataset_info.json)."""
  os.makedirs(os.path.join(directory, "shards"), exist_ok=True)
  # The latent is the generator's secret (tests read it from simulate()); records hold what a dataset would.
  records.write_shard(os.path.join(directory, SHARD), [{k: v for k, v in c.items() if k not in LATENT_KEYS}
                                                       for c in clips])
  lines = "".join(json.dumps(manifest_row(c), sort_keys=True) + "\n" for c in clips)
  info = {
      "kind": "features", "token_rate": TOKEN_RATE,
      "audio": {"type": "features", "frames_per_token": 1, "dim": AUDIO_DIM,
                "mean": stats["audio"][0], "std": stats["audio"][1]},
      "visual": {"type": "features", "frames_per_token": 1, "dim": VISUAL_DIM,
                 "mean": stats["visual"][0], "std": stats["visual"][1]},
      "num_clips": len(clips), "shards": [SHARD], "dataset": clips[0]["dataset"] if clips else DATASET,
      "description": description,
      "classes": list(CLASS_NAMES), "targets": ["arousal", "valence", "dominance"], "generator": generator,
  }
  records.write_atomic(os.path.join(directory, "manifest.jsonl"), lines)
  records.write_atomic(os.path.join(directory, records.DATASET_INFO), json.dumps(info, indent=1) + "\n")


def _check_replaceable(output: str) -> None:
  """Refuses to replace an existing directory that is not an avt_synth output."""
  if not os.path.exists(output):
    return
  info_path = os.path.join(output, records.DATASET_INFO)
  try:
    with open(info_path) as f:
      ok = json.load(f).get("dataset") in DATASETS.values()
  except (OSError, ValueError):
    ok = False
  if not ok and (not os.path.isdir(output) or os.listdir(output)):
    raise FileExistsError(f"{output} exists and is not an avt_synth directory ({info_path} missing or of another "
                          f"dataset): choose another --output")


def simulate(*, version: int = 1, seed: int = 0, **sizes: int) -> tuple[dict[str, list[dict]], dict[str, Any]]:
  """(parts, generator record): the clips of the labelled part, the pool and the pool validation part, in memory,
  each with its `latent_level` (the time mean of (z0, z1), which decides the label).

  `sizes`: num_speakers, clips_per_speaker, pretrain_speakers, pretrain_clips_per_speaker, validation_speakers,
  min_tokens, max_tokens (each defaults to DEFAULTS[version]).
  """
  if version not in VERSIONS:
    raise ValueError(f"--version={version}; expected one of {VERSIONS}")
  unknown = sorted(set(sizes) - set(DEFAULTS[version]))
  if unknown:
    raise TypeError(f"generate() got unknown sizes {unknown}; expected some of {sorted(DEFAULTS[version])}")
  n = {**DEFAULTS[version], **{k: int(v) for k, v in sizes.items() if v is not None}}
  for name, lo in (("num_speakers", 1), ("clips_per_speaker", 1), ("pretrain_speakers", 0),
                   ("pretrain_clips_per_speaker", 0), ("validation_speakers", 0), ("min_tokens", 1)):
    if n[name] < lo:
      raise ValueError(f"--{name}={n[name]}; expected >= {lo}")
  if n["max_tokens"] < n["min_tokens"]:
    raise ValueError(f"--max_tokens={n['max_tokens']} < --min_tokens={n['min_tokens']}")
  if version == 1 and n["validation_speakers"]:
    raise ValueError("--validation_speakers is a v2 part (v1 has none): use --version=2")
  generator = {k: n[k] for k in ("num_speakers", "clips_per_speaker", "pretrain_speakers",
                                 "pretrain_clips_per_speaker", "min_tokens", "max_tokens")}
  generator["seed"] = seed
  if version != 1:  # v1's dataset_info.json stays as it was written before versions existed.
    generator.update(version=version, validation_speakers=n["validation_speakers"])
  dataset = DATASETS[version]
  tokens = (n["min_tokens"], n["max_tokens"])
  rng = np.random.default_rng(seed)
  world = make_world(rng, version)
  labelled = generate_part(rng, world, "synth", n["num_speakers"], n["clips_per_speaker"], True, *tokens, dataset)
  pool = generate_part(rng, world, "synthpre", n["pretrain_speakers"], n["pretrain_clips_per_speaker"], False,
                       *tokens, dataset)
  held = generate_part(rng, world, "synthval", n["validation_speakers"], n["pretrain_clips_per_speaker"], True,
                       *tokens, dataset)
  return {"labelled": labelled, "pretrain": pool, "pretrain_val": held}, generator


def generate(output: str, *, version: int = 1, seed: int = 0, **sizes: int) -> dict[str, int]:
  """Writes the benchmark to `output` (labelled part), `output`/pretrain (unlabelled pool) and, for v2,
  `output`/pretrain_val (the pool's validation speakers); `sizes` as for simulate().

  The directory is built next to `output` and moved into place, so an interrupted run leaves no partial dataset.
  Returns the clip counts of the parts.
  """
  parts, generator = simulate(version=version, seed=seed, **sizes)
  labelled, pool, held = parts["labelled"], parts["pretrain"], parts["pretrain_val"]
  dataset = DATASETS[version]
  basis = pool if pool else labelled
  stats = {"audio": _stats(basis, "audio"), "visual": _stats(basis, "visual")}

  output = os.path.abspath(output)
  _check_replaceable(output)
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".synth-", dir=parent)
  try:
    write_part(tmp, labelled, stats, f"{dataset} labelled part (see data/synth.py)", generator)
    if pool:
      write_part(os.path.join(tmp, "pretrain"), pool, stats, f"{dataset} unlabelled pretraining pool", generator)
    if held:
      write_part(os.path.join(tmp, "pretrain_val"), held, stats,
                 f"{dataset} pretraining validation speakers (labelled; not in the fine-tuning folds)", generator)
    if os.path.exists(output):
      shutil.rmtree(output)
    os.replace(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  counts = {"labelled": len(labelled), "pretrain": len(pool)}
  if version != 1:
    counts["pretrain_val"] = len(held)
  return counts


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  sizes = {k: getattr(f, k) for k in DEFAULTS[f.version]}
  counts = generate(f.output, version=f.version, seed=f.seed, **sizes)
  print(f"wrote {f.output}: " + ", ".join(f"{v} clips in {'the labelled part' if k == 'labelled' else k + '/'}"
                                          for k, v in counts.items()))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer("version", 1, "1: the control (committed as sample/avt_synth); 2: nonlinear views.")
  flags.DEFINE_string("output", "sample/avt_synth", "Output directory (replaced if it exists).")
  flags.DEFINE_integer("num_speakers", None, "Speakers of the labelled part (v1: 20, v2: 30).")
  flags.DEFINE_integer("clips_per_speaker", None, "Clips per labelled speaker (v1: 30, v2: 24).")
  flags.DEFINE_integer("pretrain_speakers", None, "Speakers of the unlabelled pool, 0 = no pool (v1: 40, v2: 150).")
  flags.DEFINE_integer("pretrain_clips_per_speaker", None, "Clips per pool speaker (v1: 25, v2: 20).")
  flags.DEFINE_integer("validation_speakers", None, "v2: pool validation speakers in pretrain_val/ (10).")
  flags.DEFINE_integer("min_tokens", None, "Shortest clip, in tokens, 5 per second (v1: 8, v2: 16).")
  flags.DEFINE_integer("max_tokens", None, "Longest clip, in tokens (16).")
  flags.DEFINE_integer("seed", 0, "Seed of every random draw.")
  app.run(main)
