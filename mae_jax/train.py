"""The one training loop, shared by every pretraining method and the downstream tasks.

`prepare` validates the shared keys and opens the mesh, the dataset and the step plan; the entry
points (`mae_jax.tasks`) then build the trainable (`mae_jax.trainable`) and the evaluators
(`mae_jax.evaluators`) and hand them to `train_and_evaluate`: update step -> checkpoint restore
(or the trainable's initial weights) -> run record -> input -> loop (step, log, checkpoint,
evaluators, best checkpoint). Nothing here names a method, a task or an evaluator.

Sharding: one mesh axis 'data' over every device of every process. The global batch is sharded
over it; parameters and optimizer state are replicated, or with config.compute.fsdp sharded over
the same axis (`state_shardings`); the state is donated to the step.
Randomness: one base key in the state; step s uses fold_in(key, s), and masks are drawn for the
global batch inside the step, so they differ per example and per device, are reproducible from
the seed, and do not depend on the number of devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax import configlib, data, lock, optim
from mae_jax import workdir as workdirs
from mae_jax.atomic import write_atomic
from mae_jax.checkpoint import Checkpointer
from mae_jax.errors import UserError
from mae_jax.metric_writers import MetricWriter, progress_line, read_jsonl
from mae_jax.models.vit import cast_params, stack_blocks, unstack_blocks
from mae_jax.trainable import Trainable


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done.
  params: Any
  opt_state: Any
  rng: jax.Array  # base PRNG key (raw uint32[2]); never advanced, folded with the step.
  # Everything the step carries but does not differentiate: BatchNorm statistics, frozen
  # parameters of a linear probe or partial fine-tuning. {} for the pretraining methods.
  model_state: Any = dataclasses.field(default_factory=dict)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  return Mesh(np.array(devices), ("data",))


def check_workdir(workdir: str) -> None:
  """Creates the workdir if needed and proves it is writable, touching nothing already there."""
  if not workdir:
    raise UserError("--workdir is required")
  try:
    if tf.io.gfile.exists(workdir) and not tf.io.gfile.isdir(workdir):
      raise UserError(f"workdir {workdir} exists and is not a directory")
    tf.io.gfile.makedirs(workdir)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}_{jax.process_index()}")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise UserError(f"workdir {workdir} is not writable: {type(e).__name__}") from None


def split_micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] -> [B // k, k, ...]; micro-batch i is x[:, i].

  Splitting the second axis keeps each device's rows on that device (the batch axis stays
  sharded), so gradient accumulation needs no data movement.
  """
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]), batch)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int,
                    compute_dtype: str = "float32",
                    pixel_stats: Optional[tuple] = None) -> Callable:
  """(state, batch) -> (state, metrics).

  uint8 images (the pretraining input) are normalized first, with `pixel_stats` = (mean, std).

  `loss_fn(params, model_state, batch, rng, step) -> (loss, (metrics, model_state))`; gradients
  are taken for `params` only. Gradients of `grad_accum_steps` micro-batches are averaged with a
  lax.scan before one optimizer update; the model state is threaded through the micro-batches.
  With `compute_dtype` bfloat16 the loss sees a bfloat16 copy of the params (mixed precision:
  the float32 masters get float32 gradients and updates).

  A step whose loss, gradients or updates are not finite changes nothing but the step counter
  (params, optimizer and model state stay as they were) and reports metrics['nonfinite'] = 1:
  the check runs on every step, on the device, at the cost of one select per array.
  """
  grad_fn = jax.value_and_grad(
      lambda params, *args: loss_fn(cast_params(params, compute_dtype), *args), has_aux=True)

  def step_fn(state: TrainState, batch: dict):
    if "image" in batch and batch["image"].dtype == jnp.uint8:
      batch = dict(batch, image=data.normalize_on_device(batch["image"], *pixel_stats))
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      (_, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng,
                                                   state.step)
    else:
      micro = split_micro_batches(batch, grad_accum_steps)

      def accumulate(carry, i):
        g_sum, m_sum, model_state = carry
        mb = jax.tree.map(lambda x: x[:, i], micro)
        (_, (m, model_state)), g = grad_fn(state.params, model_state, mb,
                                           jax.random.fold_in(rng, i), state.step)
        return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, m_sum, m),
                model_state), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      first = jax.tree.map(lambda x: x[:, 0], micro)
      _, (m_shape, _) = jax.eval_shape(grad_fn, state.params, state.model_state, first, rng,
                                       state.step)[0]
      init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape),
              state.model_state)
      (grads, metrics, model_state), _ = jax.lax.scan(accumulate, init,
                                                      jnp.arange(grad_accum_steps))
      grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, (grads, metrics))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) &
              jnp.isfinite(optax.tree.norm(updates)))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state, model_state = keep((params, opt_state, model_state),
                                          (state.params, state.opt_state, state.model_state))
    metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step),
                   nonfinite=1.0 - finite.astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         model_state=model_state), metrics

  return step_fn


def to_global(local_batch: dict, sharding: NamedSharding) -> dict:
  """This process's rows -> global arrays laid out by `sharding` (the batch axis over 'data')."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def on_devices(batches: Iterator[dict], sharding: NamedSharding) -> Iterator[dict]:
  """`batches` copied to the devices as they come (run inside `Prefetch`, so the host-to-device
  copy of the next batches overlaps the current step); closing it closes `batches`."""
  try:
    for batch in batches:
      yield to_global(batch, sharding)
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()


class StopSignal:
  """Turns SIGTERM (spot TPU eviction, SLURM's time limit, `kill`) into a clean stop: the loop
  finishes its step, saves a checkpoint and returns; the same command resumes.

  Installed for single-process runs (from the main thread). A multi-process run leaves SIGTERM
  to JAX's preemption service (started by jax.distributed.initialize), which makes every process
  agree on one step to save at; the loop sees it through Orbax's `reached_preemption`.
  """

  def __init__(self):
    self.received: Optional[str] = None
    self._previous = None

  def __enter__(self) -> "StopSignal":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signal.Signals(signum).name
    print(f"{self.received} received: saving a checkpoint after this step", flush=True)

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Prefetch:
  """Runs an iterator in a background thread, `size` items ahead.

  `close()` stops the thread and closes the iterator in it, so no thread is left inside the input
  pipeline (TensorFlow) when the interpreter exits.
  """

  def __init__(self, it: Iterator, size: int):
    self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(it,), daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    """Waits for room unless stopped; False once stopped."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, it):
    try:
      for item in it:
        if not self._put((True, item)):
          break
    except BaseException as e:  # surfaced in the consumer's thread.
      self._put((False, e))
    finally:
      close = getattr(it, "close", None)
      if close is not None:
        close()

  def __next__(self):
    ok, item = self._queue.get()
    if not ok:
      raise item
    return item

  def __iter__(self):
    return self

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=30)


@dataclasses.dataclass
class Plan:
  """Step arithmetic of a run, derived from the config and the dataset size."""
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  peak_lr: float


def make_plan(config, steps_per_epoch: int) -> Plan:
  total = (config.total_steps if config.total_steps > 0
           else int(round(config.num_epochs * steps_per_epoch)))
  total = max(total, 1)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  return Plan(steps_per_epoch, total, min(warmup, total),
              optim.scaled_lr(config.optimizer.base_lr, config.batch_size))


FSDP_MIN_SIZE = 2**16  # smaller arrays stay replicated under config.compute.fsdp.


def state_shardings(abstract_state, mesh: Mesh, fsdp: bool):
  """Shardings for a state pytree: all replicated, or with `fsdp` every array of at least
  FSDP_MIN_SIZE elements split over 'data' on its largest axis divisible by the mesh size (XLA
  gathers the parameters where a matmul needs them and reduce-scatters their gradients)."""
  n = mesh.devices.size

  def one(x):
    if fsdp and x.size >= FSDP_MIN_SIZE:
      for axis in sorted(range(x.ndim), key=lambda a: -x.shape[a]):
        if x.shape[axis] % n == 0:
          return NamedSharding(mesh, P(*[("data" if a == axis else None)
                                         for a in range(x.ndim)]))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract_state)


@dataclasses.dataclass
class Update:
  """What `build_update` makes: the optimizer, fresh state, the jitted step."""
  tx: optax.GradientTransformation
  init_state: Callable  # rng -> TrainState (fresh weights), pure: jit / eval_shape it.
  step: Callable  # jitted (state, batch) -> (state, metrics), state donated.
  shardings: Any  # the TrainState's shardings (replicated unless config.compute.fsdp).
  scan: bool = False  # config.compute.scan: params hold the blocks stacked (`stack_blocks`).
  fsdp: bool = False  # config.compute.fsdp: the state is sharded (`state_shardings`).


def build_update(config, mesh: Mesh, plan: Plan, trainable: Trainable) -> Update:
  """The trainable's optimizer (`trainable.optimizer(schedule, params)`), fresh state and the
  update step, jitted over `mesh`: batch sharded on 'data', state replicated (or FSDP-sharded)
  and donated.
  """
  schedule = optim.warmup_cosine(plan.peak_lr, plan.total_steps, plan.warmup_steps,
                                 config.optimizer.min_lr)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  image_shape = (1, *configlib.image_hw(config.image_size), 3)
  shapes = jax.eval_shape(trainable.init_state, jax.random.PRNGKey(0),
                          jnp.zeros(image_shape, jnp.float32))
  tx = trainable.optimizer(schedule, shapes[0])

  compute = config.get("compute")
  scan = bool(compute and compute.scan)
  fsdp = bool(compute and compute.fsdp)

  def init_state(rng):
    init_rng, base_rng = jax.random.split(rng)
    params, model_state = trainable.init_state(init_rng, jnp.zeros(image_shape, jnp.float32))
    if scan:  # the weights of the unrolled init, stacked once for the scanned blocks.
      params = stack_blocks(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=base_rng, model_state=model_state)

  shardings = state_shardings(jax.eval_shape(init_state, jax.random.PRNGKey(0)), mesh, fsdp)
  step_fn = jax.jit(make_train_step(trainable.train_loss, tx, schedule, config.grad_accum_steps,
                                    compute.dtype if compute else "float32",
                                    (tuple(config.dataset.mean), tuple(config.dataset.std))),
                    in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, replicated), donate_argnums=0)
  return Update(tx, init_state, step_fn, shardings, scan, fsdp)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run needs before its trainable is built: the mesh, the dataset and the plan."""
  mesh: Mesh
  source: data.Source
  plan: Plan


def prepare(config, devices: Optional[Sequence[jax.Device]] = None) -> Setup:
  """Validates the shared keys against the device count, opens the dataset, plans the steps;
  nothing is written."""
  mesh = make_mesh(devices)
  configlib.validate_common(config, mesh.devices.size)
  source = data.get_source(config.dataset)
  spe = data.steps_per_epoch(source, config.dataset.train_split, config.batch_size,
                             jax.process_count())
  return Setup(mesh, source, make_plan(config, spe))


def train_and_evaluate(config, workdir: str, trainable: Trainable, evaluators: Sequence,
                       setup: Setup, stop_at_step: Optional[int] = None,
                       allow_config_change: bool = False) -> dict:
  """Trains `trainable` in `workdir`, resuming from its newest intact checkpoint (a fresh run
  starts from `trainable.initial_weights`), and runs each evaluator when `due(step)`. With
  config.best_metric ('<eval>/<metric>') the state of its highest value is kept in WORKDIR/best.

  One run per workdir (WORKDIR/run.lock). A workdir with checkpoints resumes only with the
  training config it was written with (configlib.training_changes), unless
  `allow_config_change`. `stop_at_step` ends the run early (after saving a checkpoint) as a
  preemption would; SIGTERM or a preemption notice seen by Orbax (multi-host) does the same.
  Returns {'state': final TrainState, 'history': [logged scalars]} (for tests and notebooks).
  """
  mesh, plan = setup.mesh, setup.plan
  # --- Update step; nothing in the workdir is touched before it builds.
  update = build_update(config, mesh, plan, trainable)
  check_workdir(workdir)
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  def gathered(state):  # evaluators take replicated weights (an all-gather under FSDP).
    return jax.device_put(state, replicated) if update.fsdp else state

  with contextlib.ExitStack() as cleanup:  # closed in reverse: input, writers, checkpoints, lock.
    cleanup.enter_context(lock.hold(workdir))
    # --- Checkpoints: resume from the newest intact one, or start fresh.
    ckpt = Checkpointer(workdir, config.keep_checkpoints)
    cleanup.callback(ckpt.close)
    best_ckpt = Checkpointer(workdir, 1, name="best") if config.best_metric else None
    if best_ckpt:
      cleanup.callback(best_ckpt.close)
    best_value = best_ckpt.best_metric(config.best_metric) if best_ckpt else None
    check_run_record(config, workdir, ckpt, allow_config_change)
    state, start_step = restore_or_init(config, ckpt, update, trainable)
    is_writer = jax.process_index() == 0
    if is_writer and start_step < plan.total_steps:
      write_run_record(config, workdir, trainable)
    # A finished run writes nothing, not even an empty TensorBoard file (or a W&B run).
    writer = cleanup.enter_context(MetricWriter(
        workdir, enabled=is_writer and start_step < plan.total_steps, config=config))
    print(summary_line(trainable, state, mesh, plan), flush=True)

    # --- Input: the data stream continues where the checkpoint left it; `prefetch` batches are
    # decoded and copied to the devices ahead of the step that takes them.
    batches = Prefetch(on_devices(data.train_batches(
        setup.source, config.dataset, split=config.dataset.train_split,
        image_size=config.image_size, global_batch_size=config.batch_size, seed=config.seed,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count()), batch_sharding), config.dataset.prefetch)
    cleanup.callback(batches.close)

    # --- Loop.
    history, log = [], StepLog(config, plan)
    compiled = None
    stop_signal = cleanup.enter_context(StopSignal())
    for step in range(start_step, plan.total_steps):
      t0 = time.perf_counter()
      batch = next(batches)
      if compiled is not None:
        log.waited(time.perf_counter() - t0)
      else:  # the first batch is fetched before compiling: not a wait.
        t0 = time.perf_counter()
        compiled = update.step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        print(f"compiled train step in {compile_s:.1f}s", flush=True)
        writer.write(step, {"compile_s": compile_s})
        log.restart_clock()
      state, metrics = compiled(state, batch)
      done = step + 1
      log.add(done, metrics)
      preempted = ckpt.reached_preemption(done) or stop_signal.received is not None
      stop = preempted or (stop_at_step is not None and done >= stop_at_step)
      due_log = done % config.log_every_steps == 0 or done == plan.total_steps or stop
      due_save = done % config.checkpoint_every_steps == 0 or done == plan.total_steps or stop
      due = [e for e in evaluators if e.due(done)]
      # Non-finite steps were not applied; with 'stop' the run ends before anything reports
      # or saves past one (waiting for this step's flag only when something is due).
      bad = log.first_nonfinite(wait=due_log or due_save or bool(due))
      if bad is not None and config.nan_policy == "stop":
        raise NonFiniteStep(bad, ckpt)
      if due_log:
        scalars = log.flush(done)
        writer.write(done, scalars)
        history.append({"step": done, **scalars})
      if due_save:
        ckpt.save(done, state, _meta(config, done, plan))
      for evaluator in due:
        t0 = time.perf_counter()
        results = evaluator.run(gathered(state))
        scalars = {f"{evaluator.name}/{k}": float(v) for k, v in results.items()
                   if np.ndim(v) == 0}
        print(f"step {done} | {evaluator.name} " +
              " ".join(f"{k} {v:.4f}" for k, v in results.items() if np.ndim(v) == 0) +
              f" ({time.perf_counter() - t0:.1f}s)", flush=True)
        writer.write(done, scalars)
        writer.write_images(done, {f"{evaluator.name}/{k}": v for k, v in results.items()
                                   if np.ndim(v) == 3})
        history.append({"step": done, **scalars})
        value = scalars.get(config.best_metric)
        if value is not None and (best_value is None or value > best_value):
          best_value = value
          best_ckpt.save(done, state, {**_meta(config, done, plan), **scalars})
      if stop:
        why = f" ({stop_signal.received or 'preemption notice'})" if preempted else ""
        print(f"stopping at step {done}{why}; re-run the same command to resume", flush=True)
        break
    if start_step >= plan.total_steps:
      print(f"nothing to do: the latest checkpoint is at step {start_step} of "
            f"{plan.total_steps}", flush=True)
  return {"state": state, "history": history}


class NonFiniteStep(UserError):
  """The loss or the gradients of a step were not finite (config.nan_policy='stop')."""

  def __init__(self, step: int, ckpt: Checkpointer):
    latest = ckpt.latest_step()
    last = (f"the last good checkpoint is step {latest} in {ckpt.directory}" if latest is not None
            else "no checkpoint was saved yet")
    super().__init__(
        f"loss or gradients are not finite at step {step}: stopped without saving it; {last}; "
        "re-run to resume from it (with a lower learning rate: add --allow_config_change; "
        "--config.nan_policy=skip skips such steps)")
    self.step = step


def restore_or_init(config, ckpt: Checkpointer, update: Update, trainable: Trainable):
  """(state, start step): the newest intact checkpoint's (damaged ones are moved aside), or
  fresh weights (the trainable's initial weights where it has them, e.g. a pretrained encoder)
  at step 0."""
  seed_key = jax.random.PRNGKey(config.seed)
  shardings = update.shardings
  if ckpt.all_steps():
    abstract = jax.eval_shape(update.init_state, seed_key)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    restored = ckpt.restore_latest(abstract)
    if restored is None:
      raise UserError(f"every checkpoint in {ckpt.directory} is damaged (moved to "
                      f"{ckpt.damaged_directory}); re-run to start this workdir from scratch")
    state, meta, start_step = restored
    if meta.get("batch_size") != config.batch_size:
      print(f"warning: checkpoint was written with batch_size={meta.get('batch_size')}, "
            f"resuming with {config.batch_size}; the data stream position is recomputed")
    print(f"resumed from {ckpt.directory} at step {start_step}", flush=True)
    return state, start_step
  state = jax.jit(update.init_state, out_shardings=shardings)(seed_key)
  initial = trainable.initial_weights(unstack_blocks(state.params), state.model_state)
  if initial is not None:  # the optimizer starts from these.
    params, model_state = initial
    if update.scan:
      params = stack_blocks(params)
    params, model_state = jax.device_put((params, model_state),
                                         (shardings.params, shardings.model_state))
    state = state.replace(params=params, model_state=model_state,
                          opt_state=jax.jit(update.tx.init,
                                            out_shardings=shardings.opt_state)(params))
  return state, 0


def check_run_record(config, workdir: str, ckpt: Checkpointer,
                     allow_config_change: bool = False) -> None:
  """A workdir with checkpoints continues only with the training config of its config.json:
  UserError listing the differences (configlib.training_changes) unless
  `allow_config_change`, which prints them instead."""
  path = os.path.join(workdir, workdirs.CONFIG_FILE)
  if not ckpt.all_steps() or not tf.io.gfile.exists(path):
    return
  stored = workdirs.read_config(workdir).to_dict()
  changes = configlib.training_changes(stored, json.loads(config.to_json_best_effort()))
  if not changes:
    return
  listed = "; ".join(changes[:6]) + (f"; ... ({len(changes) - 6} more)" if len(changes) > 6
                                     else "")
  if not allow_config_change:
    raise UserError(f"{workdir} holds a run trained with another config ({listed}); resume "
                    "with its values, use another --workdir, or pass --allow_config_change")
  print(f"warning: continuing {workdir} with a changed config ({listed})", flush=True)


def write_run_record(config, workdir: str, trainable: Trainable) -> None:
  """WORKDIR/config.json (the resolved config: what readers rebuild the model from) and the
  trainable's own files, each replaced atomically."""
  files = {workdirs.CONFIG_FILE: config.to_json_best_effort(indent=2, sort_keys=True),
           **trainable.workdir_files()}
  for file_name, text in files.items():
    write_atomic(os.path.join(workdir, file_name), text)


def summary_line(trainable: Trainable, state: TrainState, mesh: Mesh, plan: Plan) -> str:
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  num_frozen = sum(x.size for x in jax.tree.leaves(state.model_state))
  frozen = f" (+{num_frozen / 1e6:.2f}M not trained)" if num_frozen else ""
  return (f"{trainable.name}: {num_params / 1e6:.2f}M trained parameters{frozen}, "
          f"{mesh.devices.size} devices, {jax.process_count()} processes, "
          f"{plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps, "
          f"peak lr {plan.peak_lr:.3g}")


class StepLog:
  """Device metrics since the last log, fetched together (one host transfer per log, not per
  step), averaged over the applied steps, with throughput, input wait, epoch and the progress
  line; and each step's non-finite flag (`first_nonfinite`).

  The loop runs at most one step ahead of the devices: before it fetches the next batch it waits
  for every step but the newest. So a wait for input is time the devices have (almost) nothing
  queued, and `input_wait_s` (seconds per step) says how input-bound the run is. A run whose
  typical step (the median of an interval) waits more than INPUT_BOUND of a step's time is told
  so once, in one line; a lone stall (a new epoch's pipeline filling its shuffle buffer, an
  evaluator) is not that."""

  INPUT_BOUND = 0.2

  def __init__(self, config, plan: Plan):
    self.batch_size, self.plan = config.batch_size, plan
    self.report_skipped = config.get("nan_policy", "stop") == "skip"
    self.pending: list = []  # (step, metrics on device)
    self.unchecked = 0  # index of the first pending step whose flag was not read.
    self.waits: list[float] = []  # input wait of each step since the last log.
    self.logs = 0
    self.warned = False
    self.restart_clock()

  def restart_clock(self) -> None:
    self.t0 = time.perf_counter()

  def add(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))

  def waited(self, seconds: float) -> None:
    self.waits.append(seconds)

  def first_nonfinite(self, wait: bool = False) -> Optional[int]:
    """The first step since the last call whose update was not finite (not applied), or None.

    Waits for every pending step but the newest; with `wait` for the newest too."""
    last = len(self.pending) if wait else len(self.pending) - 1
    while self.unchecked < last:
      step, metrics = self.pending[self.unchecked]
      self.unchecked += 1
      if float(metrics["nonfinite"]):
        return step
    return None

  def flush(self, step: int) -> dict[str, float]:
    fetched = jax.device_get([m for _, m in self.pending])
    applied = [m for m in fetched if not m["nonfinite"]] or fetched
    scalars = {k: float(np.mean([m[k] for m in applied])) for k in fetched[0]
               if k != "nonfinite"}
    scalars["lr"] = float(fetched[-1]["lr"])
    if self.report_skipped:
      scalars["skipped_steps"] = float(sum(m["nonfinite"] for m in fetched))
    elapsed = time.perf_counter() - self.t0
    scalars["img_per_s"] = len(fetched) * self.batch_size / max(elapsed, 1e-9)
    scalars["input_wait_s"] = sum(self.waits) / len(fetched)
    scalars["epoch"] = step / self.plan.steps_per_epoch
    eta = (self.plan.total_steps - step) * elapsed / len(fetched)
    print(progress_line(step, self.plan.total_steps, scalars, eta), flush=True)
    # The first interval starts with the input pipeline's own warm-up: not judged.
    step_s = elapsed / len(fetched)
    typical = float(np.median(self.waits)) if self.waits else 0.0
    if self.logs and not self.warned and typical > self.INPUT_BOUND * step_s:
      self.warned = True
      print(f"warning: input-bound: steps {step - len(fetched) + 1}-{step} waited "
            f"{typical:.3f} s for their batch in a step of {step_s:.3f} s (median); the "
            "accelerators idle while the host decodes images (more host cores or a faster "
            "data_dir help; input_wait_s in metrics.jsonl)", flush=True)
    self.pending, self.unchecked, self.waits = [], 0, []
    self.logs += 1
    self.restart_clock()
    return scalars


def _meta(config, step: int, plan: Plan) -> dict:
  return {"step": step, "epoch": step / plan.steps_per_epoch, "method": config.method,
          "task": config.task,
          "batch_size": config.batch_size, "steps_per_epoch": plan.steps_per_epoch,
          "examples_seen": step * config.batch_size}


def read_metrics(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl, in order."""
  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))
