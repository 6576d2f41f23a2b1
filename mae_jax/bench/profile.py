"""Where a train step's time goes on a CPU, by kernel and by the module each kernel came from.

  python -m mae_jax.bench --config=mae:vit_s16 --batch_size=32 --config.compute.dtype=float32 \
      --profile=/tmp/mae_profile

One step of the real train step (as `step.run_bench` builds it) runs under `jax.profiler.trace`
with XLA:CPU's per-kernel trace events on (`--xla_cpu_enable_xprof_traceme`, set by the bench
before JAX starts). Each kernel event of the trace (TensorFlow's XSpace protobuf, under DIR) is
mapped to the HLO instruction it ran and, through that instruction's `op_name` metadata, to the
model code it came from: `decoder/blocks_3/mlp/fc1/dot_general` counts as `decoder blocks mlp`,
matmul. Dots (XLA:CPU runs them through YNNPACK or Eigen) are `matmul`; everything else
(elementwise fusions, copies, reductions) is `other`. The times are the kernels' own wall times
summed, which is about the step's time (the CPU runtime seldom runs two kernels at once). The
trace also opens in TensorBoard's profile plugin or xprof. CPU only: on GPUs and TPUs the
kernels run on the device and those tools read them directly.
"""

from __future__ import annotations

import collections
import glob
import os
import re

from mae_jax.errors import UserError

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"

# The transformations around the model code in an op_name: 'jit(step_fn)/', 'transpose(jvp(...))/'.
_WRAPPERS = re.compile(r"(jit|jvp|transpose|vmap|checkpoint|remat|closed_call)\([^/]*\)/?")


def _part(op_name: str) -> str:
  """'jit(step_fn)/transpose(jvp(MAE))/decoder/blocks_3/mlp/fc1/dot_general' -> 'decoder blocks
  mlp'; ops outside the encoder and decoder -> 'step (masking, loss, optimizer, input)'."""
  path = _WRAPPERS.sub("", op_name)
  parts = [p for p in path.split("/") if p]
  for i, p in enumerate(parts):
    if p in ("encoder", "decoder") or p.startswith("convvit"):
      rest = [re.sub(r"_\d+$", "", q) for q in parts[i + 1:] if not q.startswith("encoder.")
              and not q.startswith("_blocks")]
      sub = next((q for q in rest[1:] if q in ("attn", "mlp", "norm1", "norm2")), "")
      sub = "norm" if sub.startswith("norm") else sub
      head = rest[0] if rest else ""
      return " ".join(x for x in (p, head, sub) if x)
  return "step (masking, loss, optimizer, input)"


def _operation(op_name: str) -> str:
  """'jit(step_fn)/transpose(jvp(MAE))/decoder/blocks_3/attn/while/body/closed_call/dot_general'
  -> 'backward decoder/blocks/attn/while/body/closed_call/dot_general': the model code path with
  the blocks' numbers folded, forward or backward (inside a `transpose(...)` of the autodiff)."""
  path = _WRAPPERS.sub("", op_name)
  path = re.sub(r"_?blocks_\d+", "blocks", path)
  # Flax's method-call scopes ('encoder.encode', '_blocks.run') say nothing the modules don't.
  path = "/".join(p for p in path.split("/") if "." not in p)
  for where in ("encoder", "decoder"):
    if f"{where}/" in path:
      direction = "backward" if "transpose(" in op_name else "forward"
      return f"{direction} {path[path.index(where + '/'):]}"
  return _part(op_name)


def _kernel_times(trace_dir: str) -> dict[str, float]:
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TensorFlow's copy of the proto.

  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise UserError(f"no trace was written under {trace_dir}")
  space = xplane_pb2.XSpace()
  with open(sorted(paths)[-1], "rb") as f:
    space.ParseFromString(f.read())
  seconds: dict[str, float] = collections.Counter()
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if "XLAEigen" not in line.name and "PjRtCpuClient" not in line.name:
        continue  # XLA:CPU's worker threads and the thread that runs the executable.
      for event in line.events:
        name = names.get(event.metadata_id, "")
        if name and not name.startswith(("ThunkExecutor", "end:", "Threadpool", "Slinky")) \
            and name != "while":
          seconds[name] += event.duration_ps * 1e-12
  return seconds


def profile_step(config, trace_dir: str, matmul_size: int, by: str = "part") -> dict:
  """`by`: 'part' (the model part: `decoder blocks attn`) or 'op' (the operation's code path,
  forward or backward: `backward decoder/blocks/attn/qkv/dot_general`)."""
  import jax

  from mae_jax.bench import step

  if jax.default_backend() != "cpu":
    raise UserError("--profile reads XLA:CPU's kernel events; on GPUs and TPUs open a "
                    "jax.profiler trace in TensorBoard or xprof")
  if TRACEME_FLAG not in os.environ.get("XLA_FLAGS", ""):
    raise UserError(f"--profile needs XLA_FLAGS={TRACEME_FLAG} before JAX starts")
  holder = {}
  result = step.run_bench(config, steps=1, warmup=1, matmul_size=matmul_size, keep=holder)
  compiled, state, batch = holder["compiled"], holder["state"], holder["batch"]
  with jax.profiler.trace(trace_dir):
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
  hlo = compiled.as_text()
  op_names = dict(re.findall(r"\n\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo))
  kinds = dict(re.findall(r"\n\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?kind=(\w+)", hlo))
  rows: dict = collections.Counter()
  for kernel, seconds in _kernel_times(trace_dir).items():
    matmul = kernel.startswith(("ynn_fusion", "xnn_fusion", "onednn", "dot")) or (
        kinds.get(kernel) == "kCustom" and "dot" in op_names.get(kernel, ""))
    label = (_operation if by == "op" else _part)(op_names.get(kernel, ""))
    rows[(label, "matmul" if matmul else "other")] += seconds
  total = sum(rows.values())
  return {**result, "trace_dir": trace_dir, "kernel_seconds": total, "by": by,
          "parts": [{"part": p, "kind": k, "seconds": s, "share": s / total}
                    for (p, k), s in sorted(rows.items(), key=lambda kv: -kv[1])]}


def format_profile(r: dict) -> str:
  label = "operation" if r.get("by") == "op" else "part of the step"
  lines = [f"profile of one step: {r['method']} {r['config']} ({r['compute']}), batch "
           f"{r['batch_size']} x {r['image_size']} px, {r['device']}; step {r['step_s']:.2f} s, "
           f"kernels {r['kernel_seconds']:.2f} s; trace in {r['trace_dir']}",
           f"| {label} | kind | time | share |",
           "|---|---|---|---|"]
  for row in r["parts"]:
    if row["seconds"] >= 0.001:
      lines.append(f"| {row['part']} | {row['kind']} | {row['seconds']:.3f} s | "
                   f"{row['share']:.1%} |")
  matmul = sum(row["seconds"] for row in r["parts"] if row["kind"] == "matmul")
  lines.append(f"| all matmuls | | {matmul:.3f} s | {matmul / r['kernel_seconds']:.1%} |")
  return "\n".join(lines)
