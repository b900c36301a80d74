"""Tests of avt_jax.input_pipeline on small real ArrayRecord datasets written in temporary directories."""

import json
import os
import shutil
from unittest import mock

import cv2
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python import array_record_module

from avt_jax import input_pipeline as ip
from avt_jax import records, targets

KA, FA, KV, S, G = 4, 6, 2, 8, 4  # raw geometry of the test datasets
DA, DV = 5, 7  # features geometry


def _raw_info(num_clips, shards, seed=0):
  rng = np.random.default_rng(seed)
  return {"kind": "raw", "token_rate": 5.0,
          "audio": {"type": "logmel", "frames_per_token": KA, "dim": FA, "n_mels": FA,
                    "mean": rng.normal(size=FA).tolist(), "std": rng.uniform(0.5, 2.0, size=FA).tolist()},
          "visual": {"type": "face", "frames_per_token": KV, "fps": 10.0, "size": S, "channels": 3,
                     "target_size": G, "target_mean": 0.45, "target_std": 0.2},
          "num_clips": num_clips, "shards": shards}


def _features_info(num_clips, shards):
  return {"kind": "features", "token_rate": 5.0,
          "audio": {"type": "features", "frames_per_token": 1, "dim": DA},
          "visual": {"type": "features", "frames_per_token": 1, "dim": DV},
          "num_clips": num_clips, "shards": shards}


def make_clip(i, num_tokens, kind="raw", speaker=None, seed=0, dataset="avt_synth"):
  """Clip i; its label is i so that batches can be traced back to clips."""
  rng = np.random.default_rng([seed, i])
  if kind == "raw":
    audio = rng.normal(size=(num_tokens * KA, FA)).astype(np.float32)
    visual = rng.integers(0, 256, size=(num_tokens * KV, S, S, 3), dtype=np.uint8)
  else:
    audio = rng.normal(size=(num_tokens, DA)).astype(np.float32)
    visual = rng.normal(size=(num_tokens, DV)).astype(np.float32)
  return {"clip_id": f"c{i:04d}", "dataset": dataset, "speaker": speaker or f"s{i % 3}", "session": "",
          "label": np.int32(i), "targets": np.array([i, -i, np.nan], np.float32),
          "num_tokens": np.int32(num_tokens), "audio": audio, "visual": visual}


def write_dataset(root, clips, kind="raw", num_shards=2, manifest="ordered", info_seed=0):
  """Writes a prepared directory. manifest: None, "ordered" (ok rows in record order, as data.prepare writes
  them) or "reversed"."""
  os.makedirs(os.path.join(root, "shards"), exist_ok=True)
  parts = np.array_split(np.arange(len(clips)), num_shards)
  names, rows = [], []
  for k, part in enumerate(parts):
    name = f"shards/clips-{k:05d}-of-{num_shards:05d}.array_record"
    records.write_shard(os.path.join(root, name), [clips[i] for i in part])
    names.append(name)
    for i in part.tolist():
      c = clips[i]
      rows.append({"clip_id": c["clip_id"], "status": "ok", "speaker": c["speaker"], "label": int(c["label"]),
                   "extra": f"x{i % 2}", "index": 1000 + i})  # input index, as data.prepare
  rows.insert(1, {"clip_id": "broken", "status": "skipped", "reason": "no face"})
  if manifest == "reversed":
    rows.reverse()
  if manifest:
    with open(os.path.join(root, ip.MANIFEST), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  info = _raw_info(len(clips), names, info_seed) if kind == "raw" else _features_info(len(clips), names)
  with open(os.path.join(root, records.DATASET_INFO), "w") as f:
    json.dump(info, f)
  return info


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("raw"))
  lengths = [3, 7, 5, 9, 2, 6, 4, 8, 5, 3, 10, 6]
  write_dataset(root, [make_clip(i, t) for i, t in enumerate(lengths)])
  return root


@pytest.fixture(scope="module")
def feat_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("feat"))
  write_dataset(root, [make_clip(i, 3 + i % 5, kind="features") for i in range(10)], kind="features")
  return root


def take(ds_or_it, n):
  it = iter(ds_or_it)
  return [next(it) for _ in range(n)]


def labels_and_weights(batches):
  lab = np.concatenate([b["label"] for b in batches])
  w = np.concatenate([b["weight"] for b in batches])
  return lab, w


# ----- shapes and dtypes ---------------------------------------------------------------------------------------


def test_raw_batch_shapes_and_dtypes(raw_dir):
  ds = ip.make_dataset(raw_dir, split="train", global_batch_size=4, seed=0, max_tokens=5, process_index=0,
                       process_count=1)
  b = take(ds, 1)[0]
  expect = {"audio": ((4, 5, KA, FA), np.float32), "visual": ((4, 5, KV, S, S, 3), np.uint8),
            "mask": ((4, 5), np.bool_), "audio_target": ((4, 5, FA), np.float32),
            "visual_target": ((4, 5, G * G), np.float32), "label": ((4,), np.int32),
            "targets": ((4, 3), np.float32), "weight": ((4,), np.float32)}
  assert set(b) == set(expect)
  for k, (shape, dtype) in expect.items():
    assert b[k].shape == shape and b[k].dtype == dtype, (k, b[k].shape, b[k].dtype)
  np.testing.assert_array_equal(b["weight"], 1.0)
  dummy = ip.dummy_batch(ip.Geometry.from_info(records.load_dataset_info(raw_dir)), 4, 5)
  assert {k: (v.shape, v.dtype) for k, v in dummy.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}


def test_stored_batches_reach_a_cpu_device_without_a_copy(raw_dir, feat_dir):
  import jax  # pylint: disable=import-outside-toplevel
  for data in (raw_dir, feat_dir):
    ds = ip.make_dataset(data, split="train", global_batch_size=4, seed=0, max_tokens=5, process_index=0,
                         process_count=1, finish=False)
    b = take(ds, 1)[0]
    for k in ("audio", "visual"):
      assert b[k].ctypes.data % 64 == 0, (data, k)
      on_device = jax.device_put(b[k], jax.devices("cpu")[0])
      assert on_device.unsafe_buffer_pointer() == b[k].ctypes.data, (data, k)  # XLA uses the host array in place
      np.testing.assert_array_equal(np.asarray(on_device), b[k])


def test_features_batch_shapes_and_dtypes(feat_dir):
  ds = ip.make_dataset(feat_dir, split="eval", global_batch_size=4, seed=0, max_tokens=6, process_index=0,
                       process_count=1)
  batches = list(ds)
  assert len(batches) == 3  # 10 clips -> 4 + 4 + 2 real and 2 padding clips
  expect = {"audio": ((4, 6, DA), np.float32), "visual": ((4, 6, DV), np.float32), "mask": ((4, 6), np.bool_),
            "audio_target": ((4, 6, DA), np.float32), "visual_target": ((4, 6, DV), np.float32),
            "label": ((4,), np.int32), "targets": ((4, 3), np.float32), "weight": ((4,), np.float32)}
  for b in batches:
    for k, (shape, dtype) in expect.items():
      assert b[k].shape == shape and b[k].dtype == dtype, (k, b[k].shape, b[k].dtype)
  # Features kind without statistics: inputs as stored, targets equal to the inputs.
  clip = make_clip(1, 4, kind="features")
  b = batches[0]
  np.testing.assert_array_equal(b["audio"][1, :4], clip["audio"])
  np.testing.assert_array_equal(b["visual"][1, :4], clip["visual"])
  np.testing.assert_array_equal(b["audio_target"], b["audio"])
  np.testing.assert_array_equal(b["visual_target"], b["visual"])
  np.testing.assert_array_equal(b["mask"][1], [True] * 4 + [False] * 2)
  assert not b["audio"][1, 4:].any() and not b["visual"][1, 4:].any()


# ----- per-clip numbers vs hand constructions ------------------------------------------------------------------


def _hand_face_target(frames, g):
  """Loop-based grayscale + block average + frame mean (S divisible by g)."""
  kv, s = frames.shape[0], frames.shape[1]
  f = s // g
  out = np.zeros((g, g), np.float64)
  for k in range(kv):
    for a in range(g):
      for c in range(g):
        block = frames[k, a * f:(a + 1) * f, c * f:(c + 1) * f].astype(np.float64)
        gray = (0.299 * block[..., 0] + 0.587 * block[..., 1] + 0.114 * block[..., 2]) / 255.0
        out[a, c] += gray.mean() / kv
  return out.reshape(-1)


def _hand_example(clip, info, start, t):
  """Expected model example for `clip` cropped at token `start` to `t` tokens, built with explicit loops."""
  mean, std = np.array(info["audio"]["mean"]), np.array(info["audio"]["std"])
  tm, ts = info["visual"]["target_mean"], info["visual"]["target_std"]
  n = min(int(clip["num_tokens"]) - start, t)
  audio = np.zeros((t, KA, FA))
  visual = np.zeros((t, KV, S, S, 3), np.uint8)
  at = np.zeros((t, FA))
  vt = np.zeros((t, G * G))
  mask = np.zeros(t, bool)
  for j in range(n):
    src = start + j
    for k in range(KA):
      audio[j, k] = (clip["audio"][src * KA + k] - mean) / std
    at[j] = audio[j].sum(axis=0) / KA
    visual[j] = clip["visual"][src * KV:(src + 1) * KV]
    vt[j] = (_hand_face_target(visual[j], G) - tm) / ts
    mask[j] = True
  return {"audio": audio, "visual": visual, "audio_target": at, "visual_target": vt, "mask": mask}


def _assert_example(got, want):
  np.testing.assert_allclose(got["audio"], want["audio"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got["visual"], want["visual"])
  np.testing.assert_allclose(got["audio_target"], want["audio_target"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["visual_target"], want["visual_target"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got["mask"], want["mask"])


def test_pad_mask_and_targets_vs_hand(raw_dir):
  info = records.load_dataset_info(raw_dir)
  ds = ip.make_dataset(raw_dir, split="eval", global_batch_size=4, seed=0, max_tokens=5, process_index=0,
                       process_count=1)
  b = take(ds, 1)[0]
  for row, (i, t) in enumerate([(0, 3), (1, 7), (2, 5), (3, 9)]):  # padded, cropped from 0, exact, cropped
    got = {k: v[row] for k, v in b.items()}
    _assert_example(got, _hand_example(make_clip(i, t), info, 0, 5))
    assert got["label"] == i and got["weight"] == 1.0
    np.testing.assert_array_equal(got["targets"], [i, -i, np.nan])


def test_train_random_crop_matches_a_window(raw_dir):
  info = records.load_dataset_info(raw_dir)
  clip = make_clip(10, 10)
  tr = ip.ClipTransform(info, 4, train=True)
  windows = [clip["visual"][s * KV:(s + 4) * KV].reshape(4, KV, S, S, 3) for s in range(7)]
  starts = []
  for r in range(100):
    got = tr(clip, np.random.default_rng(r))
    matches = [s for s in range(7) if np.array_equal(got["visual"], windows[s])]
    assert len(matches) == 1
    if r < 5:
      _assert_example(got, _hand_example(clip, info, matches[0], 4))
    starts.append(matches[0])
  assert sorted(set(starts)) == list(range(7))  # every start 0..num_tokens-T is drawn (P(miss) ~ 1e-6)
  _assert_example(ip.ClipTransform(info, 4, train=False)(clip), _hand_example(clip, info, 0, 4))


def test_face_target_area_average_vs_opencv():
  rng = np.random.default_rng(3)
  frames = rng.integers(0, 256, size=(2, 3, 10, 10, 3), dtype=np.uint8)  # [N, Kv, S, S, 3], S=10 -> g=4
  got = targets.face_target(frames, 4)
  assert got.shape == (2, 16) and got.dtype == np.float32
  for n in range(2):
    acc = np.zeros((4, 4), np.float64)
    for k in range(3):
      f = frames[n, k].astype(np.float64)
      gray = (0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]) / 255.0
      acc += cv2.resize(gray, (4, 4), interpolation=cv2.INTER_AREA) / 3
    np.testing.assert_allclose(got[n], acc.reshape(-1), atol=1e-5)
  # Divisible sizes: plain block means.
  even = rng.integers(0, 256, size=(1, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_allclose(targets.face_target(even, 4), _hand_face_target(even, 4), atol=1e-6)


def test_batch_transform_augments_the_stored_batch_before_the_targets(raw_dir):
  # An augmentation given as batch_transform sees the assembled batch at stored scale (uint8 faces); the
  # reconstruction targets are computed afterwards, so they follow it.
  kw = dict(split="train", global_batch_size=4, seed=1, max_tokens=4, process_index=0, process_count=1)
  plain = next(iter(ip.make_dataset(raw_dir, **kw)))
  flipped = next(iter(ip.make_dataset(raw_dir, batch_transform=HorizontalFlip(), **kw)))
  np.testing.assert_array_equal(flipped["visual"], plain["visual"][..., ::-1, :])
  vt = plain["visual_target"].reshape(4, 4, G, G)[..., ::-1].reshape(4, 4, G * G)
  np.testing.assert_allclose(flipped["visual_target"], vt, atol=1e-5)
  np.testing.assert_array_equal(flipped["audio"], plain["audio"])


class HorizontalFlip:

  def __call__(self, batch, rng):
    del rng
    batch["visual"] = np.ascontiguousarray(batch["visual"][..., ::-1, :])  # [B, T, Kv, S, S(width), 3]
    return batch


# ----- order, sharding, eval coverage --------------------------------------------------------------------------


def test_process_slices_are_disjoint_and_cover(raw_dir):
  seen = []
  for p in range(2):
    ds = ip.make_dataset(raw_dir, split="train", global_batch_size=4, seed=5, max_tokens=3, process_index=p,
                         process_count=2, num_epochs=1)
    batches = list(ds)
    assert len(batches) == 3 and all(b["label"].shape == (2,) for b in batches)
    seen.append(labels_and_weights(batches)[0])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(12))


def test_order_depends_on_seed_only(raw_dir):
  def order(seed):
    ds = ip.make_dataset(raw_dir, split="train", global_batch_size=4, seed=seed, max_tokens=3, process_index=0,
                         process_count=1)
    return np.concatenate([b["label"] for b in take(ds, 9)])  # 36 clips = 3 epochs
  a, b, c = order(1), order(1), order(2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for e in range(3):  # every epoch is a permutation, and epochs differ from each other
    assert sorted(a[12 * e:12 * (e + 1)]) == list(range(12))
  assert not np.array_equal(a[:12], a[12:24])
  unshuffled = ip.make_dataset(raw_dir, split="train", global_batch_size=4, seed=1, max_tokens=3,
                               process_index=0, process_count=1, shuffle=False)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in take(unshuffled, 3)]), np.arange(12))


@pytest.mark.parametrize("process_count,batch", [(1, 5), (2, 10), (3, 3)])
def test_eval_covers_every_clip_once(raw_dir, process_count, batch):
  per_process = []
  for p in range(process_count):
    batches = list(ip.make_dataset(raw_dir, split="eval", global_batch_size=batch, seed=0, max_tokens=4,
                                   process_index=p, process_count=process_count))
    lab, w = labels_and_weights(batches)
    per_process.append((len(batches), lab[w > 0]))
    pad = w == 0
    assert (lab[pad] == -1).all() and all(not b["mask"][b["weight"] == 0].any() for b in batches)
    assert all(not b["audio"][b["weight"] == 0].any() for b in batches)
  assert len({n for n, _ in per_process}) == 1  # same number of batches on every process
  real = np.concatenate([lab for _, lab in per_process])
  assert sorted(real) == list(range(12))


# ----- checkpointing -------------------------------------------------------------------------------------------


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


class AddNoiseToMask:
  """A batch transform drawing random numbers (like span masking)."""

  def __call__(self, batch, rng):
    batch = dict(batch)
    batch["mask"] = batch["mask"] & (rng.random(batch["mask"].shape) > 0.3)
    return batch


def _train_ds(raw_dir, worker_count=0):
  return ip.make_dataset(raw_dir, split="train", global_batch_size=3, seed=7, max_tokens=4, process_index=0,
                         process_count=1, worker_count=worker_count, batch_transform=AddNoiseToMask())


def test_resume_from_state_gives_identical_batches(raw_dir):
  it = iter(_train_ds(raw_dir))
  take(it, 5)
  state = it.get_state()
  after = take(it, 4)
  it2 = iter(_train_ds(raw_dir))
  it2.set_state(state)
  _assert_batches_equal(take(it2, 4), after)
  # A fresh iterator without the state starts elsewhere.
  assert not np.array_equal(take(iter(_train_ds(raw_dir)), 1)[0]["label"], after[0]["label"])


def test_resume_through_orbax_checkpoint_manager(raw_dir, tmp_path):
  it = iter(_train_ds(raw_dir))
  take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  after = take(it, 3)
  it2 = iter(_train_ds(raw_dir))
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    assert mngr.latest_step() == 3
    mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it2)))
  _assert_batches_equal(take(it2, 3), after)


def test_prefetch_workers_give_same_batches_and_resume(raw_dir):
  ref = take(_train_ds(raw_dir), 6)
  it = iter(_train_ds(raw_dir, worker_count=2))
  try:
    first = take(it, 3)
    state = it.get_state()
  finally:
    it.close()
  _assert_batches_equal(first, ref[:3])
  it2 = iter(_train_ds(raw_dir, worker_count=2))
  try:
    it2.set_state(state)
    _assert_batches_equal(take(it2, 3), ref[3:])
  finally:
    it2.close()


@pytest.mark.parametrize("kind", ["raw", "features"])
def test_worker_batches_equal_in_process_batches_for_train_and_eval(kind, raw_dir, feat_dir):
  data = raw_dir if kind == "raw" else feat_dir
  common = dict(global_batch_size=4, seed=3, max_tokens=5, process_count=2, finish=False)
  for split, n, p, workers in (("train", 7, 0, 1), ("train", 7, 1, 3), ("eval", None, 1, 2)):
    ref = ip.make_dataset(data, split=split, process_index=p, **common)
    ref = take(ref, n) if n else list(ref)
    it = iter(ip.make_dataset(data, split=split, process_index=p, worker_count=workers, **common))
    try:
      got = [next(it) for _ in range(n)] if n else list(it)
    finally:
      it.close()
    _assert_batches_equal(got, ref)  # eval: the last batch is padded as in-process
    assert it.get_state() == {"next_index": len(ref)}


def test_worker_batches_are_not_overwritten_while_in_use(raw_dir):
  import jax  # pylint: disable=import-outside-toplevel
  kw = dict(split="train", global_batch_size=3, seed=7, max_tokens=4, process_index=0, process_count=1,
            finish=False)
  ref = take(ip.make_dataset(raw_dir, **kw), 20)
  it = iter(ip.make_dataset(raw_dir, worker_count=2, **kw))
  try:
    kept = [next(it) for _ in range(6)]        # more batches than the workers' first slots: they get more
    on_device = []
    for _ in range(6):                         # on a CPU device the arrays are used in place; the numpy ones go
      b = next(it)
      on_device.append({k: jax.device_put(v, jax.devices("cpu")[0]) for k, v in b.items()})
      assert on_device[-1]["visual"].unsafe_buffer_pointer() == b["visual"].ctypes.data
      del b
    for _ in range(8):                         # the slots of dropped numpy batches are reused, not those in use
      next(it)
  finally:
    it.close()
  _assert_batches_equal(kept + [{k: np.asarray(v) for k, v in b.items()} for b in on_device], ref[:12])


def test_worker_errors_name_the_batch_and_the_record(tmp_path):
  root = str(tmp_path)
  write_dataset(root, [make_clip(i, 3) for i in range(4)], num_shards=1)
  media = [n for n in os.listdir(os.path.join(root, "shards")) if n.endswith(".media")]
  assert media
  os.truncate(os.path.join(root, "shards", media[0]), 10)  # every record's arrays now point past the file's end
  it = iter(ip.make_dataset(root, split="eval", global_batch_size=2, seed=0, max_tokens=3, process_index=0,
                            process_count=1, worker_count=1))
  with pytest.raises(RuntimeError, match=r"(?s)batch prefetch worker 0 failed on batch 0 \(clips 0\.\.1.*media"):
    next(it)
  it.close()


def test_a_killed_worker_is_reported(raw_dir):
  import signal  # pylint: disable=import-outside-toplevel
  it = iter(ip.make_dataset(raw_dir, split="train", global_batch_size=3, seed=7, max_tokens=4, process_index=0,
                            process_count=1, worker_count=1, finish=False))
  try:
    next(it)
    os.kill(it._pool.procs[0].pid, signal.SIGKILL)  # pylint: disable=protected-access
    with pytest.raises(RuntimeError, match=r"batch prefetch worker 0 \(pid \d+\) ended with exit code -9"):
      for _ in range(10):
        next(it)
  finally:
    it.close()


def test_worker_iterator_refuses_an_old_multiprocess_state(raw_dir):
  it = iter(ip.make_dataset(raw_dir, split="train", global_batch_size=3, seed=7, max_tokens=4, process_index=0,
                            process_count=1, worker_count=1, finish=False))  # the trainer's iterator
  with pytest.raises(ValueError, match="data.worker_count=0"):
    it.set_state({"workers_state": {"0": {"next_index": 2}}, "iterations_to_skip": {"0": 0},
                  "last_worker_index": 0})


# ----- errors, filtering, mixtures -----------------------------------------------------------------------------


def test_corrupt_record_error_names_shard_and_index(tmp_path):
  root = str(tmp_path)
  write_dataset(root, [make_clip(i, 3) for i in range(4)], num_shards=1)
  bad = os.path.join(root, "shards", "bad.array_record")
  writer = array_record_module.ArrayRecordWriter(bad, "group_size:1")
  writer.write(records.encode(make_clip(4, 3)))
  writer.write(b"\xc1 this is not msgpack")
  writer.close()
  info = records.load_dataset_info(root)
  info["shards"].append("shards/bad.array_record")
  with open(os.path.join(root, records.DATASET_INFO), "w") as f:
    json.dump(info, f)
  with pytest.raises(records.RecordError, match="num_clips=4 but the shards hold 6 records"):
    ip.ClipSource(root)
  info["num_clips"] = 6
  with open(os.path.join(root, records.DATASET_INFO), "w") as f:
    json.dump(info, f)
  src = ip.ClipSource(root)
  assert src[4]["clip_id"] == "c0004"
  with pytest.raises(records.RecordError, match=r"bad\.array_record\[1\]"):
    src[5]
  ds = ip.make_dataset(root, split="eval", global_batch_size=2, seed=0, max_tokens=3, process_index=0,
                       process_count=1)
  with pytest.raises(records.RecordError, match=r"bad\.array_record\[1\]"):
    list(ds)
  with pytest.raises(records.RecordError, match=r"bad\.array_record\[1\]"):
    ip.read_metadata(root)


def test_wrong_shape_record_names_field(tmp_path):
  root = str(tmp_path)
  clip = make_clip(0, 3)
  clip["visual"] = clip["visual"][:5]
  write_dataset(root, [clip], num_shards=1)
  with pytest.raises(records.RecordError, match=r"clips-00000-of-00001\.array_record\[0\].*'visual'"):
    ip.ClipSource(root)[0]


@pytest.mark.parametrize("manifest", [None, "ordered", "reversed"])
def test_filters(tmp_path, manifest):
  root = str(tmp_path)
  write_dataset(root, [make_clip(i, 3) for i in range(12)], num_shards=3, manifest=manifest)
  rows = ip.read_metadata(root)
  assert [r["clip_id"] for r in rows] == [f"c{i:04d}" for i in range(12)]
  assert (rows[4]["shard"], rows[4]["position"]) == ("shards/clips-00001-of-00003.array_record", 0)
  # Rows come from the manifest alone when it is in record order, else from the records themselves.
  assert all(("num_tokens" in r) == (manifest != "ordered") for r in rows)

  def labels(**flt):
    src = ip.ClipSource(root, ip.RecordFilter(**flt))
    return sorted(int(src[i]["label"]) for i in range(len(src)))

  assert labels(clip_ids=["c0003", "c0007", "nope"]) == [3, 7]
  assert labels(where={"speaker": ["s1"]}) == [1, 4, 7, 10]
  assert labels(where_not={"speaker": ["s1", "s2"]}, exclude_clip_ids=["c0000"]) == [3, 6, 9]
  assert labels(predicate=lambda r: r["label"] >= 9) == [9, 10, 11]
  assert labels(where={"speaker": ["s1", "s9"]}) == [1, 4, 7, 10]  # fold lists may name absent speakers
  with pytest.raises(ValueError, match=r"none of the where_not\['speaker'\] values \['S1', 'S2'\] matches"):
    labels(where_not={"speaker": ["S1", "S2"]})
  with pytest.raises(KeyError, match="'actor'"):
    labels(where={"actor": ["s1"]})
  if manifest:
    assert labels(where={"extra": ["x1"]}) == [1, 3, 5, 7, 9, 11]  # a field only the manifest has
  # The same filter through make_dataset and the spec mapping.
  ds = ip.make_dataset({"path": root, "where": {"speaker": ["s0"]}}, split="eval", global_batch_size=8, seed=0,
                       max_tokens=3, process_index=0, process_count=1)
  lab, w = labels_and_weights(list(ds))
  assert sorted(lab[w > 0]) == [0, 3, 6, 9]


def test_split_from_dataset_info(tmp_path):
  root = str(tmp_path)
  write_dataset(root, [make_clip(i, 3) for i in range(6)], num_shards=1)
  info = records.load_dataset_info(root)
  info["splits"] = {"train": ["c0000", "c0002", "c0005"], "test": ["c0001"]}
  with open(os.path.join(root, records.DATASET_INFO), "w") as f:
    json.dump(info, f)
  src = ip.ClipSource(root, ip.RecordFilter(split="train"))
  assert [int(src[i]["label"]) for i in range(len(src))] == [0, 2, 5]
  with pytest.raises(KeyError, match="valid"):
    ip.ClipSource(root, ip.RecordFilter(split="valid"))


def test_mixture_weights_respected(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  write_dataset(a, [make_clip(i, 3) for i in range(7)])
  write_dataset(b, [make_clip(100 + i, 3) for i in range(5)], info_seed=1)
  spec = [{"path": a, "weight": 3.0}, {"path": b, "weight": 1.0}]
  ds = ip.make_dataset(spec, split="train", global_batch_size=8, seed=0, max_tokens=3, process_index=0,
                       process_count=1)
  lab = np.concatenate([x["label"] for x in take(ds, 25)])
  frac = np.mean(lab < 100)
  assert abs(frac - 0.75) < 0.03, frac
  assert set(lab[lab < 100]) == set(range(7)) and set(lab[lab >= 100]) == set(range(100, 105))
  ds = ip.make_dataset(spec, split="train", global_batch_size=8, seed=0, max_tokens=3, process_index=0,
                       process_count=1, mixture=[1.0, 4.0])
  assert abs(np.mean(np.concatenate([x["label"] for x in take(ds, 25)]) < 100) - 0.2) < 0.03
  # Eval concatenates the sources.
  lab, w = labels_and_weights(list(ip.make_dataset(spec, split="eval", global_batch_size=8, seed=0, max_tokens=3,
                                                   process_index=0, process_count=1)))
  assert sorted(lab[w > 0]) == list(range(7)) + list(range(100, 105))


def test_mixture_of_incompatible_datasets_names_both(tmp_path, feat_dir, raw_dir):
  with pytest.raises(ValueError, match=f"{raw_dir}.*{feat_dir}.*kind"):
    ip.make_dataset([raw_dir, feat_dir], split="train", global_batch_size=2, seed=0, max_tokens=3,
                    process_index=0, process_count=1)


def test_spec_parsing(raw_dir):
  [s] = ip.parse_spec(raw_dir)
  assert s.path == raw_dir and s.weight == 1.0 and not s.filter.active()
  specs = ip.parse_spec([{"path": raw_dir, "weight": 2, "clip_ids": ["c0001"]}, "tfds:crema_d/train"])
  assert specs[0].weight == 2.0 and specs[0].filter.clip_ids == ["c0001"]
  assert specs[1].path == "tfds:crema_d/train"
  with pytest.raises(ValueError, match="unknown keys"):
    ip.parse_spec({"path": raw_dir, "weigth": 2})


def test_tfds_source_adapter(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  f = tfds.features

  class AvtPipelineTestClips(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=f.FeaturesDict({
              "clip_id": f.Text(), "dataset": f.Text(), "speaker": f.Text(), "session": f.Text(),
              "label": f.Scalar(np.int32), "targets": f.Tensor(shape=(3,), dtype=np.float32),
              "num_tokens": f.Scalar(np.int32), "audio": f.Tensor(shape=(None, FA), dtype=np.float32),
              "visual": f.Tensor(shape=(None, S, S, 3), dtype=np.uint8)}),
          metadata=tfds.core.MetadataDict(dataset_info=json.dumps(_raw_info(6, []))))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        clip = make_clip(i, 3 + i)
        yield clip["clip_id"], clip

  AvtPipelineTestClips(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  spec = {"path": "tfds:avt_pipeline_test_clips/train", "data_dir": str(tmp_path), "where": {"speaker": ["s1"]}}
  ds = ip.make_dataset(spec, split="eval", global_batch_size=2, seed=0, max_tokens=5, process_index=0,
                       process_count=1)
  [b] = list(ds)
  assert sorted(b["label"]) == [1, 4]  # TFDS orders examples by a hash of their key
  row = int(np.flatnonzero(b["label"] == 4)[0])
  _assert_example({k: v[row] for k, v in b.items()}, _hand_example(make_clip(4, 7), _raw_info(6, []), 0, 5))
  src = ip.TfdsClipSource("tfds:avt_pipeline_test_clips/train", str(tmp_path))
  assert sorted(src[i]["clip_id"] for i in range(len(src))) == [f"c{i:04d}" for i in range(6)]
  assert isinstance(src[0]["speaker"], str) and src[0]["label"].dtype == np.int32


def test_face_target_is_the_quantity_of_the_dataset_statistics():
  """target_mean/std in dataset_info.json are computed by data.extract; the pipeline must use the same target."""
  extract = pytest.importorskip("data.extract")
  frames = np.random.default_rng(4).integers(0, 256, size=(6 * 5, 64, 64, 3), dtype=np.uint8)
  stats = extract.clip_statistics(np.zeros((6 * 20, 80), np.float32), frames, frames_per_token=5, target_size=8)
  want = np.stack([_hand_face_target(frames[5 * t:5 * t + 5], 8) for t in range(6)])
  assert stats["visual_count"] == want.size
  np.testing.assert_allclose(stats["visual_sum"], [want.sum()], rtol=1e-6)
  np.testing.assert_allclose(stats["visual_sumsq"], [(want * want).sum()], rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Damaged inputs: every error names the file (and the record or line where known); nothing is changed.


def _copy_dataset(src, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def test_truncated_shard_is_named_when_the_dataset_is_opened(raw_dir, tmp_path):
  root = _copy_dataset(raw_dir, tmp_path / "truncated")
  shard = os.path.join(root, "shards", "clips-00001-of-00002.array_record")
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 2)
  before = open(shard, "rb").read()
  with pytest.raises(records.RecordError) as e:
    ip.open_sources(root)
  assert str(e.value).startswith(f"{shard}: not a readable ArrayRecord shard, truncated or corrupted?")
  with pytest.raises(records.RecordError, match=f"^{shard}: not a readable ArrayRecord shard"):
    records.read_shard(shard)
  assert open(shard, "rb").read() == before


def test_media_arrays_live_beside_the_shard_and_are_read_in_place(tmp_path):
  clips = [make_clip(i, 3 + i) for i in range(3)]
  shard = str(tmp_path / "a.array_record")
  assert records.write_shard(shard, clips) == 3
  (media,) = [p for p in os.listdir(tmp_path) if p.endswith(records.MEDIA_SUFFIX)]
  with records.shard_reader(shard) as reader:
    assert all(len(r) < 600 for r in reader.read_all())  # the records hold references, not the arrays
  back = records.read_shard(shard)
  for c, b in zip(clips, back):
    _assert_same_tree(b, {k: c[k] for k in sorted(c)})
    for k in records.MEDIA_KEYS:
      assert not b[k].flags.writeable and b[k].ctypes.data % records.MEDIA_ALIGN == 0
      assert isinstance(b[k].base, (np.ndarray, np.memmap)) and not b[k].flags.owndata  # a view of the map
  # Written again with other clips: a new media file, the old one removed; the same clips: the same name.
  records.write_shard(shard, clips[:2])
  (media2,) = [p for p in os.listdir(tmp_path) if p.endswith(records.MEDIA_SUFFIX)]
  assert media2 != media and len(records.read_shard(shard)) == 2
  records.write_shard(shard, clips[:2])
  assert [p for p in os.listdir(tmp_path) if p.endswith(records.MEDIA_SUFFIX)] == [media2]
  # A truncated media file is named with the record and the bytes it lacks; a missing one with its path.
  path = tmp_path / media2
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(records.RecordError, match=rf"^{shard}\[1\]\.visual: bytes \[\d+, \d+\) of the media file "
                                                rf"{media2} requested, it has \d+: truncated"):
    records.read_shard(shard)
  path.unlink()
  with pytest.raises(records.RecordError, match=rf"^{path}: media file not found"):
    records.read_shard(shard)
  # A record read without its shard's directory says how to read it.
  with records.shard_reader(shard) as reader:
    data = reader.read([0])[0]
  with pytest.raises(records.RecordError, match="is stored in the media file"):
    records.decode(data, "x")


def test_pipeline_batches_are_the_same_from_inline_and_media_shards(tmp_path):
  # Shards written before the media files (arrays inside the records) stay readable, with the same batches.
  clips = [make_clip(i, 4 + i % 5) for i in range(10)]
  media_dir = str(tmp_path / "media")
  write_dataset(media_dir, clips)
  inline_dir = str(tmp_path / "inline")
  shutil.copytree(media_dir, inline_dir, ignore=shutil.ignore_patterns("*" + records.MEDIA_SUFFIX))
  for name in records.load_dataset_info(inline_dir)["shards"]:
    examples = records.read_shard(os.path.join(media_dir, name))
    writer = array_record_module.ArrayRecordWriter(os.path.join(inline_dir, name), records.SHARD_OPTIONS)
    for ex in examples:
      writer.write(records.encode(ex))  # encode() packs the arrays inline, as write_shard did before
    writer.close()
  def batches(d):
    ds = ip.make_dataset(d, split="train", global_batch_size=4, seed=3, max_tokens=6, num_epochs=1)
    return list(ds)
  a, b = batches(media_dir), batches(inline_dir)
  assert len(a) == len(b) > 1
  for x, y in zip(a, b):
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k], equal_nan=True) for k in x)


def test_corrupted_record_is_named_with_its_index(raw_dir, tmp_path):
  root = _copy_dataset(raw_dir, tmp_path / "corrupted")
  shard = os.path.join(root, "shards", "clips-00000-of-00002.array_record")
  good = records.read_shard(shard)
  writer = array_record_module.ArrayRecordWriter(shard, "group_size:1")
  for i, ex in enumerate(good):
    writer.write(b"\xc1 not a clip" if i == 2 else records.encode(ex))
  writer.close()
  source = ip.open_sources(root)[0][0]
  source[1]  # pylint: disable=pointless-statement
  with pytest.raises(records.RecordError, match=rf"^{shard}\[2\]: record is not a valid msgpack clip record"):
    source[2]  # pylint: disable=pointless-statement


def test_malformed_dataset_info_and_manifest_name_path_and_line(raw_dir, tmp_path):
  root = _copy_dataset(raw_dir, tmp_path / "bad_info")
  info = os.path.join(root, records.DATASET_INFO)
  text = open(info).read()
  with open(info, "w") as f:
    f.write(text[:len(text) // 2])  # cut by a crash mid-write
  with pytest.raises(records.RecordError, match=rf"^{info}:1: malformed dataset description"):
    ip.open_sources(root)
  with open(info, "w") as f:
    f.write(text)
  manifest = os.path.join(root, ip.MANIFEST)
  lines = open(manifest).read().splitlines()
  lines[3] = lines[3][:10]
  with open(manifest, "w") as f:
    f.write("\n".join(lines) + "\n")
  with pytest.raises(records.RecordError, match=rf"^{manifest}:4: "):
    ip.open_sources({"path": root, "where": {"speaker": ["s0"]}})


def test_normalisation_over_the_clips_equals_the_prepared_statistics():
  # compute_normalization over every clip of a prepared directory reproduces what data.prepare stored (an
  # independent computation: float64 sums during preparation, rounded in dataset_info.json).
  from avt_jax import config_lib  # pylint: disable=g-import-not-at-top
  sources, _ = ip.open_sources(config_lib.SAMPLE)
  stored, computed = ip.normalization_of(sources[0].info), ip.compute_normalization(sources)
  np.testing.assert_allclose(computed["audio"]["mean"], stored["audio"]["mean"], atol=1e-5)
  np.testing.assert_allclose(computed["audio"]["std"], stored["audio"]["std"], atol=1e-5)
  for k in ("target_mean", "target_std"):
    assert computed["visual"][k] == pytest.approx(stored["visual"][k], abs=1e-5)
  # A filter changes the statistics: only the kept clips count.
  crema, _ = ip.open_sources({"path": config_lib.SAMPLE, "where": {"dataset": ["crema_d"]}})
  assert ip.compute_normalization(crema)["visual"]["target_mean"] != pytest.approx(stored["visual"]["target_mean"],
                                                                                  abs=1e-4)
  # The transform uses what it is given, and says so in its errors.
  record = sources[0][0]
  plain = ip.ClipTransform(sources[0].info, 4, train=False, normalization=ip.NO_NORMALIZATION)(record)
  np.testing.assert_allclose(plain["audio"][:4], record["audio"][:4 * 20].reshape(4, 20, -1), atol=0)
  with pytest.raises(records.RecordError,
                     match=r"^x.json \(raw kind\): audio mean/std and visual target_mean"):
    ip.ClipTransform(sources[0].info, 4, train=False, normalization={"kind": "stats", "source": "x.json",
                                                                     "audio": {}, "visual": {}})



# ----- host assembly and device-side finishing ------------------------------------------------------------------

GOLDEN_BATCHES = os.path.join(os.path.dirname(__file__), "golden", "pipeline_batches.json")
# (dataset, split, batch size, max_tokens) of the golden batches: the shipped raw sample and the features benchmark.
GOLDEN_CASES = [("sample/prepared", "train", 4, 12), ("sample/prepared", "eval", 4, 12),
                ("sample/avt_synth", "train", 8, 16), ("sample/avt_synth", "eval", 16, 20)]


def _fingerprints():
  """Per clip of the first 3 batches of every golden case: the sum and the sum of |x| of every batch key."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = {}
  for path, split, bs, t in GOLDEN_CASES:
    it = iter(ip.make_dataset(os.path.join(repo, path), split=split, global_batch_size=bs, seed=3, max_tokens=t,
                              process_index=0, process_count=1))
    rows = []
    for _ in range(3):
      b = next(it)
      rows.append({k: [np.nansum(x, axis=1).tolist(), np.nansum(np.abs(x), axis=1).tolist()]
                   for k in ip.BATCH_KEYS for x in [np.asarray(b[k], np.float64).reshape(bs, -1)]})
    out[f"{path}:{split}:{bs}:{t}"] = rows
  return out


def test_batches_equal_those_of_the_per_clip_pipeline_they_replaced():
  # tests/golden/pipeline_batches.json was written by this fingerprint with the per-clip pipeline (one transform
  # per record, then stacking) at commit ff7ba3c, before batches were assembled per batch: the same clips, crops,
  # normalisation and targets for the same seed. Regenerate (AVT_UPDATE_GOLDEN=1) only for an intended change.
  # The sample/prepared cases were written again by that same commit's pipeline when sample/prepared was rebuilt
  # with the YuNet tracker (new face crops, same clips).
  got = _fingerprints()
  if os.environ.get("AVT_UPDATE_GOLDEN"):
    with open(GOLDEN_BATCHES, "w") as f:
      json.dump(got, f)
  with open(GOLDEN_BATCHES) as f:
    want = json.load(f)
  assert sorted(got) == sorted(want)
  for case in want:
    for i, (g, w) in enumerate(zip(got[case], want[case])):
      for key in w:
        np.testing.assert_allclose(g[key], w[key], rtol=1e-6, atol=1e-6, err_msg=f"{case} batch {i} {key}")


def _stats_normalization(rng):
  return {"kind": "stats", "source": "test",
          "audio": {"mean": rng.normal(size=DA).tolist(), "std": rng.uniform(0.5, 2, size=DA).tolist()},
          "visual": {"mean": rng.normal(size=DV).tolist(), "std": rng.uniform(0.5, 2, size=DV).tolist()}}


@pytest.mark.parametrize("kind", ["raw", "features"])
def test_device_finishing_equals_host_finishing(kind, raw_dir, feat_dir):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  root = raw_dir if kind == "raw" else feat_dir
  norm = None if kind == "raw" else _stats_normalization(np.random.default_rng(4))
  keys = ("audio", "visual", "mask", "audio_target", "visual_target", "label", "weight")
  for split in ("train", "eval"):
    kw = dict(split=split, global_batch_size=4, seed=2, max_tokens=5, process_index=0, process_count=1, keys=keys,
              normalization=norm)
    host = take(ip.make_dataset(root, **kw), 2)
    stored = take(ip.make_dataset(root, finish=False, **kw), 2)
    geometry = ip.Geometry.from_info(records.load_dataset_info(root))
    finisher = ip.BatchFinisher(geometry, norm or ip.normalization_of(records.load_dataset_info(root)), keys)
    device = jax.jit(lambda b: finisher(b, jnp))
    for h, s in zip(host, stored):
      assert sorted(s) == sorted(ip.stored_keys(keys)) and "audio_target" not in s
      if kind == "raw":
        assert s["visual"].dtype == np.uint8  # faces travel as bytes; the targets are made on the device
      d = jax.device_get(device(s))
      assert sorted(d) == sorted(h)
      for k in h:
        assert d[k].dtype == h[k].dtype and d[k].shape == h[k].shape, k
        np.testing.assert_allclose(d[k], h[k], rtol=1e-5, atol=1e-5, err_msg=f"{kind} {split} {k}")


def test_face_target_on_the_device_equals_the_host_target():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  frames = np.random.default_rng(5).integers(0, 256, size=(2, 3, 5, 64, 64, 3), dtype=np.uint8)
  np.testing.assert_allclose(np.asarray(targets.face_target(jnp.asarray(frames), 8, jnp)),
                             targets.face_target(frames, 8), rtol=0, atol=2e-6)


def _assert_same_tree(a, b, path="record"):
  assert type(a) is type(b), (path, type(a), type(b))
  if isinstance(b, dict):
    assert list(a) == list(b), path
    for k in b:
      _assert_same_tree(a[k], b[k], f"{path}.{k}")
  elif isinstance(b, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_same_tree(x, y, f"{path}[{i}]")
  elif isinstance(b, (np.ndarray, np.generic)):
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), path
  else:
    assert a == b, path


def test_records_are_written_byte_for_byte_as_flax_serialization_writes_them():
  # records.encode writes flax.serialization's msgpack layout itself (so preparation workers need not import jax);
  # flax is the reference: real sample clips and every leaf type a record can hold.
  from avt_jax import config_lib  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top
  real = records.read_shard(records.shard_paths(config_lib.SAMPLE)[0])
  rng = np.random.default_rng(0)
  leaves = {
      "clip_id": "c0", "dataset": "x", "speaker": "s", "session": "", "label": np.int32(-1), "num_tokens": 3,
      "audio": rng.normal(size=(3, 4, 5)).astype(np.float32), "visual": rng.integers(0, 255, (6, 8, 8, 3), np.uint8),
      "targets": {"arousal": np.float32(0.5), "valence": np.float64(-0.25), "ids": np.arange(4, dtype=np.int64)},
      "flags": np.array([True, False]), "half": np.ones((2, 2), np.float16), "empty": np.zeros((0, 7), np.int16),
      "scalar_array": np.array(2.5), "strided": np.arange(12.0).reshape(3, 4)[:, ::2], "fortran": np.asfortranarray(
          rng.normal(size=(3, 4))), "bool": True, "none": None, "bytes": b"\x00\xff", "float": 0.1, "big": 2**40,
      "list": [{"b": 1, "a": np.float32(2)}, [3, "x"]]}
  for example in [*real, leaves]:
    assert records.encode(example) == serialization.msgpack_serialize(dict(example)), example["clip_id"]
  for x in real:
    back = records.decode(records.encode(x))
    assert back.keys() == x.keys() and all(np.array_equal(back[k], x[k]) for k in x if k != "targets")
  # decode reads the arrays as views of the record's bytes, and gives what flax reads, type for type.
  for example in [*real, leaves]:
    data = records.encode(example)
    _assert_same_tree(records.decode(data), serialization.msgpack_restore(data))
  data = records.encode(real[0])
  visual = records.decode(data)["visual"]
  while isinstance(visual, np.ndarray):  # a view (of a view) of the record's bytes
    assert not visual.flags.owndata
    visual = visual.base
  assert visual is data
  # What it does not parse itself goes to flax: bfloat16 (flax's dtype), chunked arrays, other extension types.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  for extra in (jnp.ones((2, 3), jnp.bfloat16), np.arange(300, dtype=np.uint8), 1 + 2j):
    data = serialization.msgpack_serialize(dict(real[0], extra=extra))
    if isinstance(extra, np.ndarray):  # flax's chunked layout, forced here with a small chunk size
      with mock.patch.object(serialization, "MAX_CHUNK_SIZE", 100):
        data = serialization.msgpack_serialize(dict(real[0], extra=extra))
      assert b"__msgpack_chunked_array__" in data
    _assert_same_tree(records.decode(data), serialization.msgpack_restore(data))
  with pytest.raises(TypeError, match="cannot write a tuple"):
    records.encode(dict(leaves, label=(1, 2)))
  with pytest.raises(TypeError, match="dtype object"):
    records.encode(dict(leaves, audio=np.array([None, 1], dtype=object)))
