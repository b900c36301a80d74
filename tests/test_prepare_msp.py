"""MSP-IMPROV as distributed: Evalution.txt (or Evaluation.txt), session<K>/<S01A>/<P|R|S|T>/*.avi, Audio/ *.wav.

The tree is built from real clips: GRID videos remuxed into AVI under MSP-IMPROV names, and their
audio written as the separate .wav files of the Audio/ tree.
"""

import json
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest

from avt_jax import records
from data import datasets
from data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIA = os.path.join(ROOT, "sample", "media")

# MSP-IMPROV name -> the real clip it is made from.
CLIPS = {
    "session1/S01A/S/MSP-IMPROV-S01A-F01-S-FM01": "grid/video/bbaf2n.mpg",
    "session1/S01H/T/MSP-IMPROV-S01H-M01-T-MF01": "grid/video/lbbc2a.mpg",
}
# Summary lines (one per utterance, UTD-IMPROV- names) each followed by per-rater lines, as in the release; the
# third utterance has no media here.
EVALUTION_TXT = """\
UTD-IMPROV-S01A-F01-S-FM01.avi; N; A:3.000000; V:3.500000; D:3.000000;
Rater-p001; Neutral; A:3.000000; V:4.000000; D:3.000000; N:3.000000;
Rater-p002; Neutral; Other; A:3.000000; V:3.000000; D:3.000000; N:4.000000;

UTD-IMPROV-S01H-M01-T-MF01.avi; H; A:3.600000; V:4.200000; D:3.400000 ; N:2.800000;
Rater-p001; Happy; A:4.000000; V:4.000000; D:3.000000; N:3.000000;
Rater-p003; Happy; Excited; A:3.000000; V:5.000000; D:4.000000; N:3.000000;

UTD-IMPROV-S02A-F02-R-FM02.avi; A; A:4.200000; V:1.800000; D:3.900000;
Rater-p004; Angry; A:4.000000; V:2.000000; D:4.000000; N:2.000000;
"""
WANT = {  # clip id -> (label, targets, speaker, session)
    "MSP-IMPROV-S01A-F01-S-FM01": (3, (3.0, 3.5, 3.0), "msp_F01", "session1"),
    "MSP-IMPROV-S01H-M01-T-MF01": (1, (3.6, 4.2, 3.4), "msp_M01", "session1"),
}


def _remux_to_avi(src, dst):
  """Copies the video and audio packets of a real clip into an AVI container (no re-encoding)."""
  with av.open(src) as inp, av.open(dst, "w", format="avi") as out:
    v, a = inp.streams.video[0], inp.streams.audio[0]
    ov, oa = out.add_stream_from_template(v), out.add_stream_from_template(a)
    for packet in inp.demux(v, a):
      if packet.dts is None:  # the demuxer's flush packets
        continue
      packet.stream = ov if packet.stream.index == v.index else oa
      out.mux(packet)


def _write_wav(src, dst):
  """The audio of a real clip as 16-bit PCM WAV."""
  with av.open(src) as inp, av.open(dst, "w", format="wav") as out:
    a = inp.streams.audio[0]
    oa = out.add_stream("pcm_s16le", rate=a.codec_context.sample_rate, layout=a.codec_context.layout.name)
    for frame in inp.decode(a):
      frame.pts = None
      for packet in oa.encode(frame):
        out.mux(packet)
    for packet in oa.encode():
      out.mux(packet)


@pytest.fixture(scope="module")
def msp_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("MSP-IMPROV")
  for name, src in CLIPS.items():
    video = root / f"{name}.avi"
    audio = root / "Audio" / f"{name}.wav"
    video.parent.mkdir(parents=True, exist_ok=True)
    audio.parent.mkdir(parents=True, exist_ok=True)
    _remux_to_avi(os.path.join(MEDIA, src), str(video))
    _write_wav(os.path.join(MEDIA, src), str(audio))
  (root / "Evalution.txt").write_text(EVALUTION_TXT)
  return str(root)


def _manifest(out):
  return records.read_jsonl(os.path.join(out, prepare.MANIFEST))


def _records(out):
  info = records.load_dataset_info(out)
  return {ex["clip_id"]: ex for p in records.shard_paths(out, info) for ex in records.read_shard(p)}


def test_label_file_parses_summary_lines_and_skips_rater_lines(tmp_path):
  path = tmp_path / "Evalution.txt"
  path.write_text(EVALUTION_TXT)
  labels = datasets.read_msp_improv_labels(str(path))
  assert sorted(labels) == ["MSP-IMPROV-S01A-F01-S-FM01", "MSP-IMPROV-S01H-M01-T-MF01",
                            "MSP-IMPROV-S02A-F02-R-FM02"]  # UTD-IMPROV- in the file, MSP-IMPROV- on the media
  assert labels["MSP-IMPROV-S01A-F01-S-FM01"] == ("N", (3.0, 3.5, 3.0))
  assert labels["MSP-IMPROV-S01H-M01-T-MF01"] == ("H", (3.6, 4.2, 3.4))
  bad = tmp_path / "bad" / "Evalution.txt"
  bad.parent.mkdir()
  bad.write_text(EVALUTION_TXT.replace("V:4.200000", "V:high"))
  with pytest.raises(datasets.LabelError, match=r"bad/Evalution.txt:5: malformed MSP-IMPROV summary line "
                                                r"'UTD-IMPROV-S01H-M01-T-MF01.avi; H; A:3.600000; V:high"):
    datasets.read_msp_improv_labels(str(bad))


def test_label_file_either_spelling(tmp_path):
  with pytest.raises(datasets.MissingLabelFileError) as e:
    datasets.find_msp_improv_labels(str(tmp_path))
  assert str(e.value) == (f"no MSP-IMPROV label file in {tmp_path}: expected Evalution.txt (as released) or "
                          f"Evaluation.txt there")
  (tmp_path / "Evaluation.txt").write_text(EVALUTION_TXT)
  assert datasets.find_msp_improv_labels(str(tmp_path)) == (str(tmp_path / "Evaluation.txt"), "")
  (tmp_path / "Evalution.txt").write_text(EVALUTION_TXT)
  path, note = datasets.find_msp_improv_labels(str(tmp_path))
  assert path == str(tmp_path / "Evalution.txt")
  assert note == (f"{tmp_path} holds both Evalution.txt and Evaluation.txt; using {tmp_path}/Evalution.txt "
                  f"(the release's name)")


def test_prepare_msp_improv_as_distributed(msp_tree, tmp_path):
  out = str(tmp_path / "out")
  cmd = [sys.executable, "-m", "data.prepare", f"--input={msp_tree}", f"--output={out}", "--dataset=msp_improv",
         "--noprogress"]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert f"note: MSP-IMPROV labels: {msp_tree}/Evalution.txt" in res.stdout
  assert "2 clips written to 1 shard(s); 2 skipped" in res.stdout
  entries = {e["source"]: e for e in _manifest(out)}
  for name in CLIPS:
    assert entries[f"{name}.avi"]["status"] == "ok"
    # The separate audio of a video is not a second clip and does not make the video a duplicate.
    assert entries[f"Audio/{name}.wav"]["reason"] == (f"audio-only file with the clip_id of the video {name}.avi "
                                                      f"(the clip is prepared from the video)")
    assert entries[f"Audio/{name}.wav"]["category"] == "expected"
  exs = _records(out)
  assert sorted(exs) == sorted(WANT)
  for cid, (label, targets, speaker, session) in WANT.items():
    ex = exs[cid]
    assert (int(ex["label"]), ex["speaker"], ex["session"], ex["dataset"]) == (label, speaker, session, "msp_improv")
    np.testing.assert_allclose(ex["targets"], targets, rtol=1e-6)
    assert ex["visual"].shape[0] == 5 * int(ex["num_tokens"]) > 0


def test_prepare_msp_improv_label_file_errors(msp_tree, tmp_path):
  tree = tmp_path / "tree"
  shutil.copytree(os.path.join(msp_tree, "session1"), tree / "session1")
  out = tmp_path / "out"
  with pytest.raises(prepare.PrepareError) as e:
    prepare.prepare(prepare.PrepareOptions(input=str(tree), output=str(out), dataset="msp_improv", progress=False))
  assert str(e.value) == (f"no MSP-IMPROV label file in {tree}: expected Evalution.txt (as released) or "
                          f"Evaluation.txt there (or pass --msp_labels)")
  assert not out.exists()  # nothing was started
  missing = tmp_path / "labels.txt"
  with pytest.raises(prepare.PrepareError, match=f"--msp_labels: MSP-IMPROV label file {missing} does not exist"):
    prepare.prepare(prepare.PrepareOptions(input=str(tree), output=str(out), dataset="msp_improv",
                                           msp_labels=str(missing), progress=False))
  # Both spellings: the release's is used, and the summary notes say so.
  (tree / "Evalution.txt").write_text(EVALUTION_TXT)
  (tree / "Evaluation.txt").write_text(EVALUTION_TXT.replace("A:3.000000; V:3.500000", "A:1.000000; V:1.000000"))
  _, tasks, notes = prepare.plan_tasks(prepare.PrepareOptions(input=str(tree), output=str(out),
                                                              dataset="msp_improv"))
  assert notes == [f"MSP-IMPROV labels: {tree}/Evalution.txt",
                   f"{tree} holds both Evalution.txt and Evaluation.txt; using {tree}/Evalution.txt "
                   f"(the release's name)"]
  assert tasks[0].meta.clip_id == "MSP-IMPROV-S01A-F01-S-FM01" and tasks[0].meta.targets == (3.0, 3.5, 3.0)
  # A video without a summary line is named with the label file it is missing from.
  (tree / "Evalution.txt").write_text(EVALUTION_TXT.split("\n\n", 1)[1])
  _, tasks, _ = prepare.plan_tasks(prepare.PrepareOptions(input=str(tree), output=str(out), dataset="msp_improv"))
  assert tasks[0].skip_reason == (f"session1/S01A/S/MSP-IMPROV-S01A-F01-S-FM01.avi: MSP-IMPROV-S01A-F01-S-FM01 has "
                                  f"no summary line in the MSP-IMPROV label file {tree}/Evalution.txt")


def test_tfds_msp_improv_builder(msp_tree, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from data import tfds_builders
  builder = tfds_builders.AvtMspImprov(data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(manual_dir=msp_tree))
  source = tfds.data_source("avt_msp_improv", data_dir=str(tmp_path / "tfds"), download=False)["train"]
  got = {source[i]["clip_id"].decode(): source[i] for i in range(len(source))}
  assert sorted(got) == sorted(WANT)  # the .wav files are not examples
  for cid, (label, targets, speaker, session) in WANT.items():
    ex = got[cid]
    assert (int(ex["label"]), ex["speaker"], ex["session"]) == (label, speaker.encode(), session.encode())
    np.testing.assert_allclose(ex["targets"], targets, rtol=1e-6)
  assert source.dataset_info.metadata["dataset_info"]["num_clips"] == 2


def test_tfds_msp_improv_builder_needs_the_label_file(msp_tree, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from data import tfds_builders
  manual = tmp_path / "manual"
  shutil.copytree(os.path.join(msp_tree, "session1"), manual / "session1")  # the videos, no label file
  builder = tfds_builders.AvtMspImprov(data_dir=str(tmp_path / "tfds"))
  with pytest.raises(datasets.MissingLabelFileError, match=f"no MSP-IMPROV label file in {manual}: expected "
                                                           f"Evalution.txt \\(as released\\) or Evaluation.txt"):
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
