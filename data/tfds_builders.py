"""TFDS builders producing the clip records of docs/data_format.md (raw kind) as TFDS datasets.

They reuse the extraction of `python -m data.prepare` (data.extract, data.datasets): one example per clip, keyed by
clip_id, with the record keys as features, all in a `train` split. Clips that cannot be used (audio-only files,
no face, corrupt files) are left out (logged). The builder metadata holds `dataset_info`: the dataset_info.json
content with the normalisation statistics, as read by avt_jax.input_pipeline. Names carry an `avt_` prefix so
they do not collide with TFDS's own catalogue (which has a `crema_d` audio builder).

  avt_sample      the media bundled in sample/media (configs `full`, `tiny`); plain generator.
  avt_crema_d     CREMA-D VideoFlash/*.flv (labels and actors from file names); Apache Beam.
  avt_voxceleb2   VoxCeleb2 <root>/idXXXXX/<video>/<clip>.mp4 (unlabelled, speaker kept); Apache Beam.
  avt_msp_improv  MSP-IMPROV sessionK/<S01A>/<P|R|S|T>/*.avi + Evalution.txt (or Evaluation.txt) (A/V/D targets,
                  categorical label A H S N = 0..3, session, speaker); Apache Beam.

Build with array_record files, e.g.
  builder = AvtCremaD(data_dir=...)
  builder.download_and_prepare(file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir="/data/CREMA-D"))
and read with `tfds.data_source("avt_crema_d", data_dir=...)`. The Beam builders run on the DirectRunner by
default; pass `beam_options` in the DownloadConfig for Dataflow/Spark/Flink.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data import datasets as datasets_lib
from data import extract as extract_lib
from data import face as face_lib
from data import media as media_lib

SAMPLE_MEDIA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample", "media")
_TINY_SAMPLE = ("crema_d/audio/1002_DFA_ANG_XX.mp3", "crema_d/video/1001_DFA_HAP_XX.flv",
                "grid/video/bbaf2n.mpg", "grid/video/lbbc2a.mpg")


def features_dict(config: extract_lib.ExtractConfig) -> tfds.features.FeaturesDict:
  s = config.face.size
  return tfds.features.FeaturesDict({
      "clip_id": tfds.features.Text(),
      "dataset": tfds.features.Text(),
      "speaker": tfds.features.Text(),
      "session": tfds.features.Text(),
      "label": tfds.features.Tensor(shape=(), dtype=np.int32),
      "targets": tfds.features.Tensor(shape=(3,), dtype=np.float32),
      "num_tokens": tfds.features.Tensor(shape=(), dtype=np.int32),
      "audio": tfds.features.Tensor(shape=(None, config.logmel.n_mels), dtype=np.float32),
      "visual": tfds.features.Tensor(shape=(None, s, s, 3), dtype=np.uint8),
  })


def extract_example(relpath: str, root: str, resolver: datasets_lib.Resolver,
                    config: extract_lib.ExtractConfig) -> list[tuple[str, dict]]:
  """[(key, example)] for one file, or [] when the clip is skipped (the reason is logged)."""
  try:
    meta = resolver(relpath)
    clip = extract_lib.extract_raw(os.path.join(root, relpath), config)
  except (media_lib.ClipError, datasets_lib.LabelError) as e:
    logging.warning("skipping %s: %s", relpath, e)
    return []
  return [(meta.clip_id, dict(clip_id=meta.clip_id, dataset=meta.dataset, speaker=meta.speaker,
                              session=meta.session, label=np.int32(meta.label),
                              targets=np.asarray(meta.targets, np.float32), num_tokens=np.int32(clip.num_tokens),
                              audio=clip.audio, visual=clip.visual))]


def _media_files(root: str, suffixes=media_lib.VIDEO_SUFFIXES) -> list[str]:
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root} is not a directory")
  return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(suffixes))


def example_statistics(example: tuple[str, dict], config: extract_lib.ExtractConfig) -> dict:
  _, ex = example
  return extract_lib.clip_statistics(ex["audio"], ex["visual"], config.video_frames_per_token, config.target_size)


def info_from_statistics(merged: dict, config: extract_lib.ExtractConfig) -> dict:
  """dataset_info.json content (grid, parameters, normalisation statistics) stored in the builder metadata."""
  from data import prepare  # local: prepare pulls in the CLI machinery
  info = prepare.dataset_info("raw", config, merged)
  info["extractors"] = prepare.extractor_info("raw", config)
  return info


class _AvtBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared machinery: list files, extract each in an Apache Beam pipeline, statistics into the metadata.

  The builder metadata holds `dataset_info` (the dataset_info.json content of docs/data_format.md, with the
  normalisation statistics), which `avt_jax.input_pipeline.TfdsClipSource` reads.
  """

  VERSION = tfds.core.Version("1.0.0")
  DATASET = "auto"
  EXTRACT = extract_lib.ExtractConfig()

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.9 looks this up through the `importlib_resources` backport, which Python >= 3.9 installs lack.
    return epath.Path(__file__)

  def extract_config(self) -> extract_lib.ExtractConfig:
    """The extraction parameters (the same `data.extract` code and options as `python -m data.prepare`)."""
    return self.EXTRACT

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=features_dict(self.extract_config()), supervised_keys=None,
                                          metadata=self._metadata())

  def _metadata(self) -> tfds.core.MetadataDict:
    return tfds.core.BeamMetadataDict()

  def _root(self, dl_manager) -> str:
    return os.fspath(dl_manager.manual_dir)

  def _resolver(self, root: str) -> datasets_lib.Resolver:
    return datasets_lib.Resolver(self.DATASET)

  def _files(self, root: str) -> list[str]:
    return _media_files(root)

  def _extract_fn(self, root: str):
    return functools.partial(extract_example, root=root, resolver=self._resolver(root), config=self.extract_config())

  def _split_generators(self, dl_manager, pipeline):
    beam = tfds.core.lazy_imports.apache_beam
    root = self._root(dl_manager)
    examples = (pipeline | "ListFiles" >> beam.Create(self._files(root))
                | "Extract" >> beam.FlatMap(self._extract_fn(root)))
    config = self.extract_config()
    self.info.metadata["dataset_info"] = (
        examples | "Statistics" >> beam.Map(example_statistics, config=config)
        | "Merge" >> beam.CombineGlobally(extract_lib.merge_statistics)
        | "DatasetInfo" >> beam.Map(info_from_statistics, config=config))
    return {"train": examples}

  def _generate_examples(self, *args, **kwargs):
    raise NotImplementedError("Beam builders return their examples from _split_generators")


class AvtSample(_AvtBuilder):
  """The real clips bundled in sample/media (CREMA-D actor 1001 FLV, GRID MPEG-1; the .mp3s are audio-only).

  Small, so a plain generator (no Beam); the statistics are accumulated while generating.
  """

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="full", description="all bundled media"),
                     tfds.core.BuilderConfig(name="tiny", description="1 CREMA-D + 2 GRID clips (+1 audio-only)")]

  def _metadata(self) -> tfds.core.MetadataDict:
    return tfds.core.MetadataDict()

  def _root(self, dl_manager) -> str:
    return SAMPLE_MEDIA

  def _files(self, root: str) -> list[str]:
    files = _media_files(root, media_lib.MEDIA_SUFFIXES)
    return [f for f in files if f in _TINY_SAMPLE] if self.builder_config.name == "tiny" else files

  def _split_generators(self, dl_manager):
    root = self._root(dl_manager)
    return {"train": self._generate_examples(self._files(root), self._extract_fn(root))}

  def _generate_examples(self, files, extract_fn):
    stats = []
    for f in files:
      for example in extract_fn(f):
        stats.append(example_statistics(example, self.extract_config()))
        yield example
    self.info.metadata["dataset_info"] = info_from_statistics(extract_lib.merge_statistics(stats),
                                                              self.extract_config())


class AvtCremaD(_AvtBuilder):
  """CREMA-D talking faces with 6 emotion labels (ANG DIS FEA HAP NEU SAD = 0..5) and actor ids."""

  DATASET = "crema_d"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the CREMA-D VideoFlash/*.flv files (git-lfs objects of CheyneyComputerScience/CREMA-D) anywhere under
  manual_dir; file names ActorID_Sentence_Emotion_Level.flv carry actor and label.
  """


class AvtVoxceleb2(_AvtBuilder):
  """VoxCeleb2 (unlabelled; speaker = idXXXXX) for pretraining.

  Configs: "centred" (default) uses the official mp4s as the face crops they are (`data.prepare --face=centred`:
  no detection, a check for a face near the centre); "track" detects and tracks the face as for other datasets.
  """

  name = "avt_voxceleb2"
  DATASET = "voxceleb2"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=mode, description=f"face mode {mode!r} (data.face)")
                     for mode in ("centred", "track")]

  def extract_config(self) -> extract_lib.ExtractConfig:
    return extract_lib.ExtractConfig(face=face_lib.FaceConfig(mode=self.builder_config.name))
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Extract the VoxCeleb2 mp4 archives into manual_dir so that clips sit at <manual_dir>/idXXXXX/<video>/<clip>.mp4
  (dev/mp4 or test/mp4 as the root).
  """


class AvtMspImprov(_AvtBuilder):
  """MSP-IMPROV with arousal/valence/dominance targets, 4-class label, session and speaker."""

  DATASET = "msp_improv"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold MSP-IMPROV as distributed: the label file Evalution.txt (so spelled in the release;
  Evaluation.txt is accepted too) at the top and the videos at
  sessionK/<S01A>/<P|R|S|T>/MSP-IMPROV-S01A-F01-P-FM01.avi (any depth works; names carry speaker and session).
  The separate Audio/ tree of .wav files is not read: the clips take their audio from the videos.
  """

  def _resolver(self, root: str) -> datasets_lib.Resolver:
    labels, path, note = datasets_lib.load_msp_improv_labels(root)
    if note:
      logging.warning("%s", note)
    logging.info("MSP-IMPROV labels: %s", path)
    return datasets_lib.Resolver("msp_improv", labels, path)
