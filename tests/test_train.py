"""End to end: all stages on a tiny ResNet and a few hundred real Fashion-MNIST images."""

import json
import os
import shutil

import numpy as np
import pytest

from lns_jax import checkpoint as ckpt_lib
from lns_jax import trainer

pytestmark = pytest.mark.slow

from lns_testutil import smoke_config


def test_all_stages_write_results(full_run):
  workdir, results = full_run
  assert list(results) == ["pretrain", "warmup", "lns"]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert set(summary["stages"]) == {"pretrain", "warmup", "lns"}
  for stage, r in summary["stages"].items():
    assert 0.0 <= r["test"]["top1"] <= r["test"]["top5"] <= 1.0
    assert r["test"]["count"] == 64
    assert os.path.isdir(os.path.join(workdir, stage, "final"))
    assert os.path.isdir(os.path.join(workdir, stage, "checkpoints"))
    assert os.path.exists(os.path.join(workdir, stage, "result.json"))
  table = open(os.path.join(workdir, "results.md")).read()
  for stage in ("pretrain", "warmup", "lns"):
    assert f"| {stage} |" in table


def test_metrics_log_has_the_papers_curves(full_run):
  workdir, _ = full_run
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in records if r["kind"] == "train"]
  epochs = [r for r in records if r["kind"] == "epoch"]
  for key in ("ce", "aux_total", "top1", "top5", "lr", "images_per_sec", "input_wait_frac"):
    assert all(key in r for r in train), key
  lns_train = [r for r in train if r["stage"] == "lns"]
  assert any(k.startswith("aux/") for k in lns_train[0])  # per-layer auxiliary losses
  assert all(r["aux_total"] == 0.0 for r in train if r["stage"] == "pretrain")
  assert all(r["aux_total"] != 0.0 for r in lns_train)
  for r in epochs:
    assert 0.0 <= r["flip_rate_epoch"] <= 1.0 and 0.0 <= r["flip_rate_init"] <= 1.0
    assert "test_top1" in r


def test_warmup_trains_only_the_mapping(full_run):
  workdir, _ = full_run
  pre = ckpt_lib.load_variables(os.path.join(workdir, "pretrain"))
  warm = ckpt_lib.load_variables(os.path.join(workdir, "warmup"))
  lns = ckpt_lib.load_variables(os.path.join(workdir, "lns"))
  from flax import traverse_util
  fp, fw, fl = (traverse_util.flatten_dict(v["params"]) for v in (pre, warm, lns))
  fbp, fbw = (traverse_util.flatten_dict(v["batch_stats"]) for v in (pre, warm))
  assert set(fw) - set(fp) and all("mapping" in k for k in set(fw) - set(fp))
  for k, v in fp.items():  # W, BN and every other parameter frozen in warmup
    np.testing.assert_array_equal(fw[k], v, err_msg="/".join(k))
  for k, v in fbp.items():
    np.testing.assert_array_equal(fbw[k], v, err_msg="/".join(k))
  mapping_keys = [k for k in fw if "mapping" in k]
  assert any(not np.array_equal(fw[k], fl[k]) for k in mapping_keys)
  assert any(not np.array_equal(fw[k], fl[k]) for k in fp)  # lns trains everything


def test_finished_stages_are_not_run_again(full_run, tmp_path, capsys):
  workdir = str(tmp_path / "copy")  # the shared run stays untouched for other workers
  shutil.copytree(full_run[0], workdir)
  results = full_run[1]
  before = {s: os.path.getmtime(os.path.join(workdir, s, "result.json")) for s in results}
  again = trainer.train(smoke_config(), workdir)
  assert again == results
  after = {s: os.path.getmtime(os.path.join(workdir, s, "result.json")) for s in results}
  assert before == after
  assert "not run again" in capsys.readouterr().out


def test_init_from_runs_a_stage_from_a_baseline(full_run, tmp_path):
  workdir, _ = full_run
  c = smoke_config(stages="finetune", init_from=os.path.join(workdir, "pretrain"))
  c.finetune.epochs = 1
  results = trainer.train(c, str(tmp_path / "ft"))
  assert list(results) == ["finetune"]


def test_init_from_a_mismatched_checkpoint_is_refused(full_run, tmp_path):
  workdir, _ = full_run
  c = smoke_config(stages="lns", init_from=os.path.join(workdir, "pretrain"))
  c.model.name = "resnet20"  # wider than the tiny model that was saved
  out = tmp_path / "mismatch"
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="shape"):
    trainer.train(c, str(out))
  assert not (out / "lns").exists()
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="no checkpoint"):
    trainer.train(smoke_config(stages="lns", init_from=str(tmp_path / "nothing")), str(out))
