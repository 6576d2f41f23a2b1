"""TinyMIM (Ren et al. 2023, "TinyMIM: An Empirical Study of Distilling MIM Pre-trained Models"),
following the official OliverRensu/TinyMIM code (its relation-distillation loss).

A frozen MIM-pretrained ViT teacher and a small ViT student both see the whole image (no mask;
the same crop and flip, the student's copy colour-jittered). Relation targets, the paper's best:
at the teacher's chosen block and the student's last block, per head, on the block's attention
input, R_qk = softmax(Q K^T / sqrt(d_h)) and R_vv = softmax(V V^T / sqrt(d_h)) over all tokens;
loss = KL(T_qk || S_qk) + KL(T_vv || S_vv), each summed over keys and averaged over batch, heads
and queries. The student's last block is read with the teacher's head count (its q, k, v channels
regrouped: a relation depends on q, k, v only, so this is the official "last block with the
teacher's number of heads"). Optional ablation targets: 'feature' (every patch token) and 'cls'
(the cls token): a linear map of the student's final tokens regresses the teacher block's output,
whitened by a LayerNorm without affine parameters, with smooth-L1 (beta 1).

The teacher lives in the model state (cast to config.teacher.dtype, behind stop_gradient): it has
no gradient and no optimizer state, and runs inside the same jitted step. Only its first
`layer` blocks are built and loaded. The student is a plain ViT under params['encoder'], so
fine-tuning, linear probing, k-NN and export take a TinyMIM workdir with `init_from` as any other.
With relations alone, the parameters of the student's last block after q/k/v (attention
projection, norm2, MLP) and its final norm are not reached by the loss: they stay at their
initialization (no update, no weight decay), as in the official code, which never runs them.

The teacher workdir is read when the training state is first built (before any checkpoint or
config.json is written), not when the method is constructed: downstream tasks rebuild the student
from a TinyMIM workdir's config.json and must not need the teacher (it may be gone, or the
student evaluated at another resolution).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from mae_jax import configlib, optim, workdir as workdirs
from mae_jax.errors import UserError
from mae_jax.methods import base
from mae_jax.methods.mae import ENCODER_CHECKS, vit_encoder, vit_features, vit_size
from mae_jax.models.vit import ViT, dense_init

TARGETS = ("relation", "feature", "cls")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma), used by its ColorJitter.
GRAY = (0.2989, 0.587, 0.114)


# ----------------------------------------------------------------------------- losses


def relation_log_probs(a: jax.Array, b: jax.Array, num_heads: int) -> jax.Array:
  """log softmax over keys of a_q . b_k / sqrt(d_h), per head: [B, H, N, N] float32.

  a, b: [B, N, h, d] (an attention's q, k or v). Their h*d channels are regrouped into
  `num_heads` heads of d_h = h*d / num_heads channels (h*d -> num_heads x d_h), which is what a
  block with `num_heads` heads and the same qkv projection computes.
  """
  bsz, n, h, d = a.shape
  if (h * d) % num_heads:
    raise ValueError(f"{h * d} channels do not split into {num_heads} heads")
  head_dim = h * d // num_heads
  a = a.reshape(bsz, n, num_heads, head_dim)
  b = b.reshape(bsz, n, num_heads, head_dim)
  logits = jnp.einsum("bqhd,bkhd->bhqk", a, b, preferred_element_type=jnp.float32)
  return jax.nn.log_softmax(logits * head_dim**-0.5, axis=-1)


def relation_kl(teacher_log: jax.Array, student_log: jax.Array) -> jax.Array:
  """KL(T || S) of row-stochastic relations given as log-probabilities [B, H, N, N]: summed over
  keys, averaged over batch, heads and queries (the official `KLDivLoss(...).sum(-1).mean()`)."""
  kl = jnp.sum(jnp.exp(teacher_log) * (teacher_log - student_log), axis=-1)
  return jnp.mean(kl)


def whiten(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters over the last axis (feature-distillation targets)."""
  x = x.astype(jnp.float32)
  mean = x.mean(axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(x.var(axis=-1, keepdims=True) + eps)


def smooth_l1(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean smooth-L1 (beta 1; equal to the Huber loss with delta 1) over every element."""
  return jnp.mean(optax.huber_loss(pred.astype(jnp.float32), target, delta=1.0))


# ----------------------------------------------------------------------------- colour jitter


def _gray(x: jax.Array) -> jax.Array:
  return jnp.tensordot(x, jnp.asarray(GRAY, x.dtype), axes=([-1], [0]))[..., None]


def adjust_brightness(x: jax.Array, f) -> jax.Array:
  """x [H, W, 3] in [0, 1]; torchvision's tensor `adjust_brightness`: clamp(f * x)."""
  return jnp.clip(f * x, 0.0, 1.0)


def adjust_contrast(x: jax.Array, f) -> jax.Array:
  """Blend with the image's mean grey level (torchvision's tensor `adjust_contrast`)."""
  return jnp.clip(f * x + (1.0 - f) * jnp.mean(_gray(x)), 0.0, 1.0)


def adjust_saturation(x: jax.Array, f) -> jax.Array:
  """Blend with the per-pixel grey level (torchvision's tensor `adjust_saturation`)."""
  return jnp.clip(f * x + (1.0 - f) * _gray(x), 0.0, 1.0)


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation)
_ORDERS = tuple(itertools.permutations(range(len(_ADJUST))))


def color_jitter(rng: jax.Array, images: jax.Array, strength: float, mean, std) -> jax.Array:
  """torchvision's ColorJitter(strength, strength, strength) on normalized images [B, H, W, 3].

  Per image: brightness, contrast and saturation factors ~ U[max(0, 1 - s), 1 + s], applied in a
  random order (torchvision draws a permutation per call) to the de-normalized [0, 1] pixels,
  then normalized again with the same mean and std. No hue change (the paper's 0.4 is for the
  first three).
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  x = images.astype(jnp.float32) * std + mean
  b = images.shape[0]
  factor_rng, order_rng = jax.random.split(rng)
  factors = jax.random.uniform(factor_rng, (b, len(_ADJUST)), minval=max(0.0, 1.0 - strength),
                               maxval=1.0 + strength)
  order = jax.random.randint(order_rng, (b,), 0, len(_ORDERS))

  def in_order(perm):
    def apply(img, f):
      for i in perm:
        img = _ADJUST[i](img, f[i])
      return img
    return apply

  def one(img, f, o):
    return jax.lax.switch(o, [in_order(p) for p in _ORDERS], img, f)

  x = jax.vmap(one)(x, factors, order)
  return ((x - mean) / std).astype(images.dtype)


# ----------------------------------------------------------------------------- teacher


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The frozen teacher: where it comes from and the ViT of its first `layer` blocks."""
  workdir: str
  step: int  # the checkpoint step loaded (config.teacher.step 0 resolved to the latest).
  method: str  # the teacher run's method ('mae', 'tinymim', ...).
  variant: str
  depth: int  # blocks of the whole teacher.
  layer: int  # 1-based block whose attention input gives the relations.
  dtype: Any
  module: ViT  # depth = layer, deterministic.

  @property
  def width(self) -> int:
    return self.module.width

  @property
  def num_heads(self) -> int:
    return self.module.num_heads

  def describe(self) -> str:
    return (f"{self.method} {self.variant} from {self.workdir} step {self.step}, relations at "
            f"block {self.layer} of {self.depth}, {jnp.dtype(self.dtype).name}")


def read_teacher_config(workdir: str) -> ml_collections.ConfigDict:
  """TEACHER/config.json, the resolved config every pretraining run (and an import) writes."""
  try:
    return workdirs.read_config(workdir, "a pretraining workdir (ours, `python -m mae_jax.convert "
                                "import`, or TinyMIM)")
  except UserError as e:
    raise UserError(f"config.teacher.workdir: {e}") from None


def teacher_encoder(pre: ml_collections.ConfigDict, workdir: str) -> ViT:
  """The ViT encoder of a pretraining config: a TinyMIM run's student (its own teacher is not
  needed: the chain B -> S -> T reads one workdir back), else the method's encoder."""
  from mae_jax.methods import get_method  # the registry imports method modules lazily.
  try:
    if pre.get("method") == "tinymim":
      encoder, _ = vit_encoder(pre)
    else:
      encoder = get_method(pre).encoder_module
  except UserError as e:
    raise UserError(f"the teacher config {workdir}/config.json: {e}") from None
  if not isinstance(encoder, ViT):
    raise UserError(f"config.teacher.workdir={workdir} trained {pre.get('method')!r} with a "
                    f"{type(encoder).__name__} encoder; TinyMIM needs a ViT teacher")
  return encoder


def stored_encoder_shapes(workdir: str, step: Optional[int]) -> tuple[int, dict[str, tuple]]:
  """(step, {'blocks_0/attn/qkv/kernel': shape, ...}) of params['encoder'] in the checkpoint at
  `step` (None: the latest) of `workdir`, from Orbax metadata only (no array is read)."""
  where = f"config.teacher.workdir={workdir} (config.teacher.step={step or 0})"
  try:
    step, shapes = workdirs.stored_shapes(workdir, "params", step)
  except UserError as e:
    raise UserError(f"{where}: {e}") from None
  encoder = {k[len("encoder/"):]: v for k, v in shapes.items() if k.startswith("encoder/")}
  if not encoder:
    raise UserError(f"{where}: checkpoint step {step} has no params.encoder")
  return step, encoder


def _tokens(hw: tuple[int, int], patch_size: int) -> int:
  return (hw[0] // patch_size) * (hw[1] // patch_size)


def load_teacher(t_cfg, student: ViT, image_size) -> Teacher:
  """Validates config.teacher against the student and reads what the teacher is (its config and
  checkpoint metadata, no weights). UserError (one line) for anything that does not fit."""
  workdir = workdirs.absolute(t_cfg.workdir)
  pre = read_teacher_config(workdir)
  if pre.get("task", "pretrain") != "pretrain":
    raise UserError(f"config.teacher.workdir={workdir} is a {pre.get('task')!r} workdir; the "
                    "teacher must be a pretraining one")
  encoder = teacher_encoder(pre, workdir)
  t_hw, s_hw = configlib.image_hw(pre.image_size), configlib.image_hw(image_size)
  s_tokens = _tokens(s_hw, student.patch_size)
  where = f"the teacher {workdir} ({pre.model.variant} at {pre.image_size} px)"
  if encoder.patch_size != student.patch_size:
    raise UserError(f"{where} has {encoder.patch_size} px patches, the student "
                    f"{student.patch_size} px: relations need the same tokens "
                    f"({_tokens(s_hw, encoder.patch_size)} vs {s_tokens} patches at "
                    f"{image_size} px)")
  if t_hw != s_hw:
    raise UserError(f"{where} was pretrained at image_size {pre.image_size} "
                    f"({_tokens(t_hw, encoder.patch_size)} patches); this run has "
                    f"config.image_size={image_size} ({s_tokens}): teacher and student must "
                    "see the same tokens")
  depth = encoder.depth
  layer = t_cfg.layer or depth
  if not 1 <= layer <= depth:
    raise UserError(f"config.teacher.layer={t_cfg.layer} is outside 0..{depth} (0 = last) for "
                    f"the teacher's {depth} blocks")
  if student.width % encoder.num_heads:
    raise UserError(f"the student's width {student.width} does not split into the "
                    f"{encoder.num_heads} heads of {where}: its last block's relations take the "
                    "teacher's head count (choose a student width divisible by it)")
  step, stored = stored_encoder_shapes(workdir, t_cfg.step or None)
  module = encoder.clone(parent=None, depth=layer, drop_path_rate=0.0, global_pool="",
                         num_classes=0, learnable_pos_embed="pos_embed" in stored,
                         **_sowing_compute(encoder, t_cfg.dtype))
  images = jax.ShapeDtypeStruct((1, *s_hw, 3), jnp.float32)
  want = workdirs.flat_shapes(jax.eval_shape(module.init, jax.random.PRNGKey(0),
                                             images)["params"])
  # Only the first `layer` blocks are built: the checkpoint may hold more (never fewer).
  problem = workdirs.describe_mismatch(want, {k: v for k, v in stored.items() if k in want})
  if problem:
    raise UserError(f"teacher checkpoint {workdir} step {step} does not fit its config "
                    f"{pre.model.variant}: {problem}")
  return Teacher(workdir=workdir, step=step, method=str(pre.get("method")),
                 variant=str(pre.model.variant), depth=depth, layer=layer,
                 dtype=DTYPES[t_cfg.dtype], module=module)


# ----------------------------------------------------------------------------- model


class Student(nn.Module):
  """The student ViT ('encoder') and, for the ablation targets, linear maps from its final
  tokens to the teacher's width: 'feature_head' (patch tokens), 'cls_head' (cls token).

  __call__(images) -> {'tokens': [B, 1 + N, D], 'feature': [B, N, D_t], 'cls': [B, D_t]}
  (the last two only with their heads).
  """
  encoder: ViT
  teacher_width: int = 0
  feature_head: bool = False
  cls_head: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    tokens = self.encoder(images, train=train)  # [B, 1 + N, D], final-normed.
    out = {"tokens": tokens}
    if self.feature_head:
      out["feature"] = nn.Dense(self.teacher_width, kernel_init=dense_init,
                                name="feature_head")(tokens[:, 1:])
    if self.cls_head:
      out["cls"] = nn.Dense(self.teacher_width, kernel_init=dense_init,
                            name="cls_head")(tokens[:, 0])
    return out


def parse_targets(spec: str) -> tuple[str, ...]:
  """'relation,feature' -> ('relation', 'feature'); UserError for unknown or no targets."""
  names = tuple(dict.fromkeys(s.strip() for s in str(spec).split(",") if s.strip()))
  unknown = [n for n in names if n not in TARGETS]
  if unknown or not names:
    raise UserError(f"config.targets={spec!r}: a comma-separated list of {', '.join(TARGETS)}")
  return names


CHECKS = {
    "color_jitter": configlib.number("[0, inf)"),  # 0 = off.
    "teacher.step": configlib.integer("[0, inf)"),  # 0 = the latest checkpoint.
    # 1-based, 0 = the last block; the teacher's depth bounds it when the teacher is read.
    "teacher.layer": configlib.integer("[0, inf)"),
    "teacher.dtype": configlib.one_of(*DTYPES),
    **ENCODER_CHECKS}


class Method(base.Method):
  """TinyMIM distillation: config.model.{variant, drop_path_rate} (the student),
  config.teacher.{workdir, step, layer, dtype}, config.targets, config.color_jitter."""

  name = "tinymim"

  @staticmethod
  def check_config(config) -> None:
    configlib.check(config, CHECKS)
    vit_size(config)
    if config.get("compute") is not None and config.compute.get("scan"):
      raise UserError("config.compute.scan=True: TinyMIM reads q, k, v of the student's last "
                      "block, which blocks run as one scan do not expose; set it to False")
    parse_targets(config.targets)
    if not config.teacher.workdir:
      raise UserError("config.teacher.workdir=TEACHER_WORKDIR is required: a pretraining workdir "
                      "(ours, an import, or a TinyMIM run)")

  def __init__(self, config, total_steps=None):
    super().__init__(config, total_steps)
    self.check_config(config)
    self._encoder, self.grid = vit_encoder(config)
    self.targets = parse_targets(config.targets)
    self._heads = any(n in self.targets for n in ("feature", "cls"))

  # --- teacher (read on first use: see the module docstring) -------------------------------

  @functools.cached_property
  def teacher(self) -> Teacher:
    return load_teacher(self.config.teacher, self._encoder, self.config.image_size)

  # --- model -------------------------------------------------------------------------------

  @property
  def encoder_module(self) -> ViT:
    return self._encoder

  @functools.cached_property
  def model(self) -> Student:
    if not self._heads:
      return Student(encoder=self._encoder)
    return Student(encoder=self._encoder, teacher_width=self.teacher.width,
                   feature_head="feature" in self.targets, cls_head="cls" in self.targets)

  def init_params(self, rng, images):
    return self.model.init({"params": rng}, images)["params"]

  def init_state(self, rng, images):
    """Student params; model state {'teacher': the first `layer` blocks' params}, random here
    and replaced by the teacher's checkpoint in `initial_weights` (or restored on resume)."""
    student_rng, teacher_rng = jax.random.split(rng)
    t = self.teacher
    teacher = t.module.init({"params": teacher_rng}, images)["params"]
    return self.init_params(student_rng, images), {"teacher": _cast(teacher, t.dtype)}

  def initial_weights(self, params, model_state):
    t = self.teacher
    loaded, _ = workdirs.load_params(t.workdir, t.step)
    encoder = traverse_util.flatten_dict(loaded["encoder"], sep="/")
    want = traverse_util.flatten_dict(model_state["teacher"], sep="/")
    teacher = traverse_util.unflatten_dict({k: encoder[k] for k in want}, sep="/")
    print(f"tinymim: teacher {t.describe()}", flush=True)
    return params, {"teacher": _cast(teacher, t.dtype)}

  def optimizer(self, schedule, params):
    """AdamW on the parameters the loss reaches; the others (relations only: the student's last
    block after q/k/v and its final norm) get no update, as parameters without a gradient in
    the official PyTorch AdamW."""
    tx = optim.adamw(schedule, self.config.optimizer)
    unused = self.unused_params()
    if not unused:
      return tx
    labels = traverse_util.path_aware_map(
        lambda path, _: "frozen" if _is_under(path, unused) else "train", params)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

  def unused_params(self) -> tuple[tuple[str, ...], ...]:
    """Param paths the targets never reach (prefixes)."""
    if self._heads:
      return ()
    last = f"blocks_{self._encoder.depth - 1}"
    return (("encoder", last, "attn", "proj"), ("encoder", last, "norm2"),
            ("encoder", last, "mlp"), ("encoder", "norm"))

  def features(self, params, images, pool=None):
    """Mean of the patch tokens (default; the paper fine-tunes its students with average pooling)
    or 'cls'."""
    return vit_features(self, params, images, pool, "avg", "TinyMIM")

  # --- loss --------------------------------------------------------------------------------

  def teacher_outputs(self, teacher_params, images) -> dict[str, jax.Array]:
    """{'q', 'k', 'v': [B, N, h_t, d_t] at the chosen block's attention, 'tokens': that block's
    output [B, 1 + N, D_t] (only for the feature / cls targets)}; no gradient flows back."""
    t = self.teacher
    last = f"blocks_{t.layer - 1}"
    capture = ((lambda mdl, method: mdl.name == last and method == "__call__")
               if self._heads else False)
    _, inter = t.module.apply({"params": jax.lax.stop_gradient(teacher_params)},
                              images.astype(t.dtype), mutable=["intermediates"],
                              capture_intermediates=capture)
    block = inter["intermediates"][last]
    out = {name: block["attn"][name][0] for name in ("q", "k", "v")}
    if self._heads:
      out["tokens"] = block["__call__"][0]
    return jax.lax.stop_gradient(out)

  def loss(self, params, batch, rng, train=True, step=None, teacher_params=None):
    """(loss, metrics) of the student `params` against the frozen teacher's `teacher_params`
    (the model state's 'teacher'; required)."""
    del step
    if teacher_params is None:
      raise ValueError("TinyMIM's loss needs teacher_params (the training loop passes "
                       "model_state['teacher'] through train_loss)")
    images = batch["image"]
    jitter_rng, drop_rng = jax.random.split(rng)
    student_images = images
    if train and self.config.color_jitter > 0:
      d = self.config.dataset
      student_images = color_jitter(jitter_rng, images, self.config.color_jitter, d.mean, d.std)
    out, inter = self.model.apply({"params": params}, student_images, train=train,
                                  rngs={"dropout": drop_rng}, mutable=["intermediates"])
    attn = inter["intermediates"]["encoder"][f"blocks_{self._encoder.depth - 1}"]["attn"]
    teacher = self.teacher_outputs(teacher_params, images)
    heads = self.teacher.num_heads
    metrics = {}
    if "relation" in self.targets:
      for a, b in (("q", "k"), ("v", "v")):
        t_rel = relation_log_probs(teacher[a], teacher[b], heads)
        s_rel = relation_log_probs(attn[a][0], attn[b][0], heads)
        metrics[f"loss_{a}{b}"] = relation_kl(t_rel, s_rel)
    if "feature" in self.targets:
      metrics["loss_feature"] = smooth_l1(out["feature"], whiten(teacher["tokens"][:, 1:]))
    if "cls" in self.targets:
      metrics["loss_cls"] = smooth_l1(out["cls"], whiten(teacher["tokens"][:, 0]))
    loss = sum(metrics.values())
    return loss, {"loss": loss, **metrics}

  def train_loss(self, params, model_state, batch, rng, step):
    loss, metrics = self.loss(params, batch, rng, train=True, step=step,
                              teacher_params=model_state["teacher"])
    return loss, (metrics, model_state)

  def eval_metrics(self, params, model_state, batch, rng, step):
    return self.loss(params, batch, rng, train=False, step=step,
                     teacher_params=model_state["teacher"])[1]


def _sowing_compute(encoder: ViT, dtype: str) -> dict:
  """ViT attributes for the teacher where the ViT has compute options (`compute`: dtype, remat,
  scan): blocks unrolled (a scanned stack sows no q/k/v), no remat (no backward pass), the
  teacher's dtype. {} for a ViT without them (parameters and images are cast instead)."""
  compute = getattr(encoder, "compute", None)
  if compute is None or not dataclasses.is_dataclass(compute):
    return {}
  return {"compute": dataclasses.replace(compute, dtype=dtype, remat=False, scan=False)}


def _cast(tree, dtype):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def _is_under(path: tuple[str, ...], prefixes) -> bool:
  return any(tuple(path[:len(p)]) == p for p in prefixes)
