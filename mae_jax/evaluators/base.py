"""The evaluator protocol and what every evaluator is built with.

An evaluator is `due(step) -> bool` and `run(state) -> {name: value}`: numbers are logged as
scalars under '<config entry name>/<name>', uint8 [H, W, C] arrays as TensorBoard images. The
loop calls `run` after the step's update when `due` says so, with the TrainState (parameters
replicated, also under FSDP). `Periodic` is the usual cadence: every `every_steps` steps and at
the last step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Optional

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax import data


@dataclasses.dataclass(frozen=True)
class Context:
  """What an evaluator may use: the run's config (dataset, image_size, batch_size, seed), the
  trainable it scores, the dataset, the mesh and the run's length."""
  config: ml_collections.ConfigDict
  trainable: Any
  source: data.Source
  mesh: Mesh
  total_steps: int
  steps_per_epoch: int

  def eval_batches(self, split: Optional[str] = None, batch_size: Optional[int] = None,
                   sharded: bool = True) -> Iterator[dict]:
    """One pass over `split` (default dataset.eval_split) through the eval transform (resize,
    centre crop): {'image', 'label', 'mask'} (mask 0 on padding rows). `sharded`: this
    process's share of each global batch (`to_global` makes the arrays); else every batch
    whole on every process."""
    c = self.config
    split = split or c.dataset.eval_split
    procs = (jax.process_index(), jax.process_count()) if sharded else (0, 1)
    return data.eval_batches(self.source, c.dataset, split=split, image_size=c.image_size,
                             global_batch_size=batch_size or c.batch_size,
                             process_index=procs[0], process_count=procs[1])

  def to_global(self, local: Mapping[str, Any]) -> dict:
    """This process's rows -> global arrays sharded over the mesh's 'data' axis."""
    sharding = NamedSharding(self.mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class Periodic:
  """`due(step)`: every `every_steps` steps and at the last step of the run (0: never)."""

  def __init__(self, every_steps: int, total_steps: int):
    self.every_steps = every_steps
    self.total_steps = total_steps

  def due(self, step: int) -> bool:
    return bool(self.every_steps) and (step % self.every_steps == 0 or step == self.total_steps)
