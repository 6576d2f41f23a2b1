"""The benchmark measures the real train step and reports consistent figures."""

import math

from configs import mae as mae_config
from mae_jax.bench import step as bench


def test_run_bench_reports_consistent_figures():
  c = mae_config.get_config("tiny")
  c.image_size = 16
  c.batch_size = 16
  c.model.decoder_width = 32
  c.model.decoder_depth = 1
  r = bench.run_bench(c, steps=2, warmup=1, matmul_size=256)
  assert r["batch_size"] == 16 and r["image_size"] == 16
  assert r["step_s"] > 0 and r["compile_s"] > 0
  assert 0 < r["peak_ratio"] < 1.5  # the step cannot run far above the measured matmul peak.
  # A step of a 0.8M-parameter model on 16 images costs at least the forward matmuls.
  assert r["flops_per_step"] > 16 * 2 * 0.5e6 * 4
  assert r["peak_memory_bytes"] > 0 and math.isfinite(r["loss"])
  assert "mae Mu/4" in bench.format_table(r)


def test_compile_only_and_markdown_rows_name_the_compute_options():
  c = mae_config.get_config("tiny")
  c.image_size = 16
  c.batch_size = 8
  c.model.decoder_depth = 2
  c.compute.scan = True
  c.compute.remat = True
  r = bench.run_bench(c, steps=1, warmup=0, matmul_size=64, compile_only=True)
  assert "step_s" not in r and r["compile_s"] > 0 and r["xla_memory_bytes"] > 0
  assert 0 < r["trace_s"] < r["compile_s"] and 0 < r["xla_compile_s"] < r["compile_s"]
  assert r["compute"] == "float32 remat scan"
  row = bench.markdown_row(r)
  assert row.startswith("| mae Mu/4 | float32 remat scan | 8 |") and row.count("|") == 11
  assert "float32 remat scan" in bench.format_table(r)
