"""Optional Weights & Biases logging (config.wandb), in offline mode: the run's .wandb log holds
the scalars of metrics.jsonl, a resume continues the same W&B run, and without the package the
run stops with one line before anything is written."""

import glob
import json
import os
import struct
import sys
import zlib

import jax
import pytest

from conftest import small_config
from mae_jax import configlib, tasks
from mae_jax.errors import UserError
from mae_jax.metric_writers import WANDB_RUN_ID_FILE, read_jsonl

# wandb's transaction log (run-<id>.wandb) is the LevelDB log format: a 7-byte header (':W&B',
# magic 0xBEE1 little-endian, version byte), then 32 KiB blocks of chunks [crc32 u32 | length u16 | type u8 | data]
# (type 1 full, 2 first, 3 middle, 4 last), each record a serialized wandb_internal_pb2.Record.
# wandb 0.31 ships no Python reader of it (its writer is the Go wandb-core), so this one reads the
# framing and lets wandb's own protobuf decode the records.
_BLOCK, _CHUNK_HEADER = 32768, 7


def read_wandb_records(path):
  from wandb.proto import wandb_internal_pb2
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, data[:7]
  records, pending, pos = [], b"", 7
  while pos + _CHUNK_HEADER <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < _CHUNK_HEADER:  # block trailer: zero padding.
      pos += left
      continue
    crc, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK_HEADER])
    if (crc, length, kind) == (0, 0, 0):
      pos += left
      continue
    chunk = data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
    assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad chunk checksum at byte {pos}"
    pos += _CHUNK_HEADER + length
    if kind in (1, 2):
      pending = chunk
    else:
      pending += chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
  return records


def history_of(records):
  """{step: {key: value}} of the history records (W&B's internal keys left out)."""
  out = {}
  for r in records:
    if r.WhichOneof("record_type") == "history":
      row = out.setdefault(r.history.step.num, {})
      for item in r.history.item:
        key = item.key or "/".join(item.nested_key)
        if not key.startswith("_"):
          row[key] = json.loads(item.value_json)
  return out


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  home = tmp_path / "wandb_home"
  for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"),
                   ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
    (home / sub).mkdir(parents=True)
    monkeypatch.setenv(var, str(home / sub))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  return home


def _config(data_dir, **overrides):
  return small_config(data_dir, **{"wandb.enabled": True, "wandb.mode": "offline",
                                   "wandb.tags": "demo, tiny", **overrides})


def test_offline_run_logs_the_metrics_and_a_resume_continues_it(tmp_path, digits_data_dir,
                                                                wandb_env):
  wd = tmp_path / "run_a"
  devices = jax.devices()[:1]
  tasks.pretrain(_config(digits_data_dir), str(wd), devices=devices, stop_at_step=2)
  run_id = (wd / WANDB_RUN_ID_FILE).read_text().strip()
  assert run_id
  tasks.pretrain(_config(digits_data_dir), str(wd), devices=devices)
  assert (wd / WANDB_RUN_ID_FILE).read_text().strip() == run_id  # the resume reused it.

  logs = sorted(glob.glob(str(wd / "wandb" / "offline-run-*" / "run-*.wandb")))
  assert len(logs) == 2 and all(os.path.basename(p) == f"run-{run_id}.wandb" for p in logs), logs
  assert not os.listdir(wandb_env / "dir")  # wandb's files went under WORKDIR/wandb.
  first, second = (read_wandb_records(p) for p in logs)
  for records in (first, second):
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == run_id and run.display_name == "run_a"
    assert list(run.tags) == ["demo", "tiny"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["method"] == "mae" and config["image_size"] == 16
    assert config["wandb"]["mode"] == "offline"

  history = history_of(first + second)
  jsonl = read_jsonl(str(wd / "metrics.jsonl"))
  losses = {r["step"]: r["loss"] for r in jsonl if "loss" in r}
  assert sorted(losses) == [2, 4]
  assert {s: history[s]["loss"] for s in losses} == losses  # the same values, bit for bit.
  for record in jsonl:  # every scalar of metrics.jsonl, compile_s of both starts included.
    for key, value in record.items():
      if key != "step":
        assert history[record["step"]][key] == value, (record["step"], key)


def test_disabled_mode_writes_no_wandb_files(tmp_path, digits_data_dir, wandb_env):
  wd = tmp_path / "off"
  tasks.pretrain(_config(digits_data_dir, **{"wandb.mode": "disabled"}), str(wd),
                 devices=jax.devices()[:1], stop_at_step=2)
  assert (wd / "metrics.jsonl").exists()
  assert not (wd / "wandb").exists() and not (wd / WANDB_RUN_ID_FILE).exists()


def test_without_the_package_one_line_before_anything_is_written(tmp_path, digits_data_dir,
                                                                 monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError.
  wd = tmp_path / "wd"
  config = _config(digits_data_dir)
  with pytest.raises(UserError) as e:
    tasks.check_config(config)
  assert str(e.value) == configlib.WANDB_MISSING
  assert str(e.value) == ("config.wandb.enabled needs the wandb package: "
                          "pip install 'mae-jax[wandb]'")
  with pytest.raises(UserError) as e:
    tasks.pretrain(config, str(wd), devices=jax.devices()[:1])
  assert str(e.value) == configlib.WANDB_MISSING and "\n" not in str(e.value)
  assert not wd.exists()
  # Off (the default), nothing imports it.
  tasks.check_config(small_config(digits_data_dir))
