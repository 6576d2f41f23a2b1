"""Vision Transformer encoder as pure-functional Flax Linen modules.

Numerics follow the official MAE / timm ViT so that exported weights reproduce our features:
LayerNorm eps 1e-6, exact (erf) GELU, xavier-uniform Linear layers, a xavier-uniform patch
embedding over the flattened (p, p, 3) kernel, cls token normal(0.02), and a fixed 2-D sin-cos
position embedding in the official channel order. Parameter names mirror the official ones
(`patch_embed/proj`, `blocks_{i}/attn/qkv`, `norm`, ...) so conversion is a rename.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name -> (width, depth, heads); MLP ratio is 4 for all.
SIZES = {
    "Nano": (64, 4, 2),  # CPU demo student (TinyMIM), not from a paper.
    "Mu": (128, 4, 4),  # CPU demo size, not from a paper.
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}


@dataclasses.dataclass(frozen=True)
class ViTSize:
  width: int
  depth: int
  num_heads: int
  patch_size: int
  mlp_ratio: float = 4.0


def parse_variant(variant: str) -> ViTSize:
  """'B/16' -> ViTSize(768, 12, 12, 16). Raises ValueError for unknown names."""
  m = re.fullmatch(r"(\w+)/(\d+)", variant)
  if not m or m.group(1) not in SIZES:
    raise ValueError(f"unknown ViT variant {variant!r}; expected NAME/PATCH with NAME in "
                     f"{sorted(SIZES)} (e.g. 'B/16')")
  width, depth, heads = SIZES[m.group(1)]
  return ViTSize(width, depth, heads, int(m.group(2)))


# Official MAE initializes every nn.Linear with xavier_uniform and bias 0.
dense_init = nn.initializers.xavier_uniform()
# The official code applies xavier_uniform to the patch-embedding weight viewed as [D, 3*p*p]:
# fan_in = p*p*3, fan_out = D (flax's default conv fans would multiply the receptive field in).
patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
token_init = nn.initializers.normal(stddev=0.02)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[M] positions -> [M, dim] as [sin(pos*w_k), cos(pos*w_k)], w_k = 1/10000^(k/(dim/2))."""
  assert dim % 2 == 0
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, [grid_h*grid_w (+1), dim], float32.

  As the official MAE (facebookresearch/mae util/pos_embed.py, get_2d_sincos_pos_embed): its
  `np.meshgrid(grid_w, grid_h)` puts the column (w) index in grid[0], which encodes the first
  dim/2 channels, and the row (h) index in grid[1], the last dim/2; tokens are flattened row-major
  over (h, w); an all-zero row is prepended for the cls token. The official function takes one
  square `grid_size`; for a grid_h x grid_w grid the same meshgrid runs over arange(grid_h) and
  arange(grid_w), so a square grid gives exactly the official values.
  """
  if dim % 4 != 0:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
  hh, ww = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  emb = np.concatenate([sincos_1d(dim // 2, ww), sincos_1d(dim // 2, hh)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
  return emb.astype(np.float32)


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """[M] fractions -> [M, 4] weights of taps -1, 0, 1, 2 (Keys' cubic kernel, torch's a = -0.75)."""
  x = np.abs(np.stack([t + 1, t, 1 - t, 2 - t], axis=-1))
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, far)


def _resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
  """Bicubic resampling of one axis to `size` samples, align_corners=False, edges clamped (as
  torch's upsample_bicubic2d)."""
  n = x.shape[axis]
  src = (np.arange(size) + 0.5) * (n / size) - 0.5  # align_corners=False
  i0 = np.floor(src).astype(np.int64)
  w = _cubic(src - i0)  # [size, 4]
  out = 0.0
  for k in range(4):
    taps = np.take(x, np.clip(i0 + k - 1, 0, n - 1), axis=axis)
    shape = [1] * x.ndim
    shape[axis] = size
    out = out + taps * w[:, k].reshape(shape)
  return out


def resample_pos_embed(pos: np.ndarray, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       num_extra: int) -> np.ndarray:
  """[1, num_extra + gh*gw, D] -> [1, num_extra + gh'*gw', D] float32: bicubic on the (h, w) grid
  as torch's `F.interpolate(mode='bicubic', align_corners=False)` in the official MAE
  `interpolate_pos_embed` (fine-tuning at another resolution); the extra (cls) tokens are kept
  as they are. ValueError when the token count does not match `old_grid`."""
  pos = np.asarray(pos, np.float64)
  extra, grid = pos[:, :num_extra], pos[:, num_extra:]
  d = grid.shape[-1]
  if grid.shape[1] != old_grid[0] * old_grid[1]:
    raise ValueError(f"pos_embed has {grid.shape[1]} grid tokens, not {old_grid[0]}x{old_grid[1]}")
  grid = grid.reshape(old_grid[0], old_grid[1], d)
  grid = _resize_axis(_resize_axis(grid, new_grid[0], 0), new_grid[1], 1)
  return np.concatenate([extra, grid.reshape(1, -1, d)], axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> tokens: [B, H, W, C] -> [B, H/p * W/p, D]."""
  width: int
  patch_size: int

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", kernel_init=patch_init,
                name="proj")(x)
    b, h, w, d = x.shape
    return x.reshape(b, h * w, d)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (as timm / official MAE).

  The product runs through `jax.nn.dot_product_attention` (`implementation`: 'xla', or 'cudnn'
  for cuDNN's fused flash attention on GPUs) or `blocked_attention` ('blocked', for CPUs);
  `attention_implementation` picks. When the
  'intermediates' collection is mutable (analysis, TinyMIM's relations) the probabilities are
  needed as an array, so the product is written out and q, k, v and the map are sown."""
  num_heads: int
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, kernel_init=dense_init, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    # One unstack rather than three slices: its gradient is one concatenation, not three pads.
    q, k, v = jnp.unstack(qkv, axis=2)  # [B, N, heads, head_dim]
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "q", q)
      self.sow("intermediates", "k", k)
      self.sow("intermediates", "v", v)
      attn = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k)
      attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
      self.sow("intermediates", "attention", attn)  # [B, heads, N, N]
      out = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
    else:
      out = _dot_product_attention(q, k, v, self.implementation)  # [B, N, heads, head_dim]
    return nn.Dense(d, kernel_init=dense_init, name="proj")(out.reshape(b, n, d))


def _dot_product_attention(q, k, v, implementation: str):
  """softmax(q k^T / sqrt(head_dim)) v with logits and softmax in float32 (every path)."""
  if implementation == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):
      pass  # a shape, dtype or cuDNN version it does not take: found while tracing.
  if implementation == "blocked":
    return blocked_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


# Bytes of attention probabilities one block of `blocked_attention` holds: a few MiB, so that a
# block's logits, probabilities and their gradients stay in the CPU's caches.
BLOCK_BYTES = 8 * 2**20


def blocked_attention(q, k, v):
  """The attention product a few examples at a time (q, k, v: [B, N, heads, head_dim]).

  Heads-major ([heads, N, head_dim] per example) batched matmuls over blocks of examples in a
  `lax.map`, each block under `jax.checkpoint`: the backward pass recomputes a block's
  probabilities instead of storing all [B, heads, N, N] of them (as flash attention does). On
  XLA:CPU this keeps the softmax's passes in cache; it also stores less for the backward.
  Block i holds examples i, i + n, i + 2n, ... (n blocks): with the batch sharded over devices,
  every device then works on each block, and when n divides the per-device batch no example
  crosses devices."""
  b, n, h, d = q.shape
  per_example = h * n * n * 4
  blocks = min(m for m in range(1, b + 1) if b % m == 0 and (m == b or (b // m) * per_example
                                                              <= BLOCK_BYTES))
  scale = jnp.asarray(d**-0.5, q.dtype)

  @jax.checkpoint
  def one_block(qkv):
    bq, bk, bv = qkv  # [B / blocks, heads, N, head_dim]
    logits = jnp.matmul(bq * scale, bk.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(bv.dtype)
    return jnp.matmul(probs, bv)

  # [B, N, heads, head_dim] -> [blocks, B / blocks, heads, N, head_dim], example i*blocks + j in
  # block j.
  strided = [t.reshape(b // blocks, blocks, n, h, d).transpose(1, 0, 3, 2, 4) for t in (q, k, v)]
  out = jax.lax.map(one_block, tuple(strided))  # [blocks, B / blocks, heads, N, head_dim]
  return out.transpose(1, 0, 3, 2, 4).reshape(b, n, h, d)


def attention_implementation(choice: str, dtype) -> str:
  """'auto' -> 'cudnn' on a GPU backend with 16-bit activations (cuDNN's flash attention takes
  only bfloat16 / float16), 'blocked' on a CPU, else 'xla' (TPUs, GPUs in float32); an explicit
  choice is taken as it is."""
  if choice != "auto":
    return choice
  backend = jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if backend == "gpu" and half:
    return "cudnn"
  return "blocked" if backend == "cpu" else "xla"


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * (1 + erf(x / sqrt(2))) / 2: torch.nn.GELU()'s formula. (jax.nn.gelu writes
  it with erfc, whose XLA:CPU kernel costs several passes of exp and selects.)"""
  return x * (0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype))))


class Mlp(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.hidden, kernel_init=dense_init, name="fc1")(x)
    x = gelu(x)
    return nn.Dense(d, kernel_init=dense_init, name="fc2")(x)


class DropPath(nn.Module):
  """Stochastic depth per example; identity when deterministic or rate == 0.

  `rate` in the call overrides the attribute (a traced per-layer rate under `run_blocks`' scan).
  """
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool, rate=None):
    rate = self.rate if rate is None else rate
    if deterministic or (isinstance(rate, float) and rate == 0.0):
      return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return x * mask.astype(x.dtype) / jnp.asarray(keep, x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  attention: str = "xla"  # Attention.implementation

  @nn.compact
  def __call__(self, x, deterministic: bool = True, drop_path=None):
    d = x.shape[-1]
    y = nn.LayerNorm(epsilon=1e-6, name="norm1")(x)
    y = Attention(self.num_heads, self.attention, name="attn")(y)
    x = x + DropPath(self.drop_path)(y, deterministic, drop_path)
    y = nn.LayerNorm(epsilon=1e-6, name="norm2")(x)
    y = Mlp(int(d * self.mlp_ratio), name="mlp")(y)
    return x + DropPath(self.drop_path)(y, deterministic, drop_path)


@dataclasses.dataclass(frozen=True)
class Compute:
  """How blocks are computed; none of it changes the initial weights or (beyond float rounding)
  the result. `dtype`: the activations' dtype (parameters stay float32: `cast_params` makes the
  compute copy inside the step); `remat`: recompute each block's activations in the backward
  pass instead of storing them; `scan`: run the blocks as one `lax.scan` over stacked
  parameters, so compile time does not grow with depth. Initialization runs unrolled either way
  (`blocks_0`, `blocks_1`, ...); a scan run's training state then holds the blocks stacked
  (`stack_blocks`: one subtree `blocks` with a leading depth axis) and readers of its
  checkpoints unstack them (`unstack_blocks`). Under scan, blocks sow no intermediates: analysis
  runs without it. `attention`: 'auto' | 'xla' | 'cudnn' | 'blocked'
  (`attention_implementation`)."""
  dtype: str = "float32"
  remat: bool = False
  scan: bool = False
  attention: str = "auto"

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)


def compute_of(config) -> Compute:
  """The Compute of `config.compute` (absent: the float32 default)."""
  c = config.get("compute") if hasattr(config, "get") else None
  if c is None:
    return Compute()
  return Compute(dtype=c.dtype, remat=bool(c.remat), scan=bool(c.scan),
                 attention=c.get("attention", "auto"))


def cast_params(tree, dtype):
  """Floating leaves of `tree` in `dtype` (float32: unchanged). Gradients flow back through the
  cast to the float32 masters."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# Block-name prefixes `compute.scan` runs as one loop: ViT and decoder 'blocks', ConvViT stage 3.
SCANNED_PREFIXES = ("blocks", "blocks3")


def _is_tree(x) -> bool:
  return isinstance(x, Mapping)


def stack_blocks(params):
  """Per-block parameters -> the scan layout: in every dict of the tree, `{p}_0 .. {p}_{n-1}`
  (p in SCANNED_PREFIXES, n >= 2) become one subtree `{p}` whose leaves have a leading axis n.
  The training state of a `compute.scan` run holds this layout, so the step scans over the
  parameters as they are (no per-step stacking or slicing, whose cost grows with depth)."""
  if not _is_tree(params):
    return params
  out, used = {}, set()
  for p in SCANNED_PREFIXES:
    n = 0
    while f"{p}_{n}" in params:
      n += 1
    if n >= 2:
      names = [f"{p}_{i}" for i in range(n)]
      out[p] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params[k] for k in names])
      used.update(names)
  for k, v in params.items():
    if k not in used:
      out[k] = stack_blocks(v)
  return out


def unstack_blocks(params):
  """The inverse of `stack_blocks` (per-block trees pass through unchanged)."""
  if not _is_tree(params):
    return params
  out = {}
  for k, v in params.items():
    if k in SCANNED_PREFIXES and _is_tree(v):
      n = jax.tree.leaves(v)[0].shape[0]
      for i in range(n):
        out[f"{k}_{i}"] = jax.tree.map(lambda x, i=i: x[i], v)
    else:
      out[k] = unstack_blocks(v)
  return out


def run_blocks(module: nn.Module, x, *, prefix: str, num_heads: int, mlp_ratio: float,
               rates, train: bool, compute: Compute):
  """Applies `Block`s `{prefix}_0 .. {prefix}_{n-1}` (n = len(rates), drop-path rate per block)
  of `module` (called from its compact method) to x [B, N, D].

  Unrolled: one submodule per block (wrapped in nn.remat with compute.remat). Scanned: one block
  body runs under `lax.scan` (under `jax.checkpoint` with remat) over the stacked parameters
  `module`'s tree holds as `{prefix}` (`stack_blocks` layout, a scan run's training state), or
  over `{prefix}_i` stacked on the fly when given the per-block layout (a scan-configured model
  applied to a fresh init or to a checkpoint read back per block, e.g. the k-NN task on a scan
  run's workdir). Initialization always runs unrolled, so both forms start from the same weights.
  """
  depth = len(rates)
  deterministic = not train
  attention = attention_implementation(compute.attention, compute.dtype)
  if not compute.scan or depth < 2 or module.is_initializing():
    cls = nn.remat(Block, static_argnums=(2,)) if compute.remat else Block
    for i in range(depth):
      x = cls(num_heads, mlp_ratio, float(rates[i]), attention, name=f"{prefix}_{i}")(
          x, deterministic)
    return x
  params = module.variables["params"]
  if prefix in params:
    stacked = params[prefix]
  else:
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                           *[params[f"{prefix}_{i}"] for i in range(depth)])
  block = Block(num_heads, mlp_ratio, attention=attention)
  drop = train and float(np.max(rates)) > 0.0
  keys = jax.random.split(module.make_rng("dropout"), depth) if drop else None

  def body(h, layer):
    p, rate, key = layer
    out = block.apply({"params": p}, h, not drop, rate if drop else None,
                      rngs={"dropout": key} if drop else None)
    return out, None

  if compute.remat:
    body = jax.checkpoint(body)
  x, _ = jax.lax.scan(body, x, (stacked, jnp.asarray(rates, jnp.float32), keys))
  return x


def gather_tokens(x, ids):
  """x: [B, N, D], ids: [B, M] int -> [B, M, D] (static shapes; no boolean indexing)."""
  return jnp.take_along_axis(x, ids[:, :, None], axis=1)


class _OwnParam(nn.Module):
  """One parameter of the parent's own scope (attach with `nn.share_scope`), created on the first
  `create` rather than in the parent's `setup`: its shape may follow the input (`pos_embed`), and
  the parent's parameters draw their init RNGs in call order, as they would in a compact
  `__call__`. (The method is not `__call__`, so `capture_intermediates` never records it.)"""
  param_name: str

  @nn.compact
  def create(self, init_fn, *init_args) -> jax.Array:
    return self.param(self.param_name, init_fn, *init_args)


class _Blocks(nn.Module):
  """`run_blocks` in the parent's own scope (attach with `nn.share_scope`): the blocks are the
  ViT's `blocks_{i}` (or its stacked `blocks` under compute.scan), with the stochastic depth rule
  of timm (rates linear from 0 to drop_path_rate)."""
  depth: int
  num_heads: int
  mlp_ratio: float
  drop_path_rate: float
  compute: Compute

  @nn.compact
  def run(self, x: jax.Array, train: bool) -> jax.Array:
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    return run_blocks(self, x, prefix="blocks", num_heads=self.num_heads,
                      mlp_ratio=self.mlp_ratio, rates=rates, train=train, compute=self.compute)


class ViT(nn.Module):
  """ViT encoder with cls token and 2-D sin-cos position embedding; optionally a classifier.

  `__call__(images, ids_keep=None, train=False)`: images [B, H, W, 3] (NHWC, normalized). If
  `ids_keep` [B, M] is given only those patch tokens are encoded (MAE's asymmetric encoder):
  position embeddings are gathered with the tokens and the cls token is prepended after the
  gather, as in the official MAE. `__call__` is the composition of public stages, which methods
  that edit the tokens (SimMIM's mask token, DropPos's position mask token) call themselves, so
  the encoder knows no method and its parameter tree stays the plain ViT one:
    embed_patches(images)     -> [B, N, D] patch embeddings in the compute dtype
    position_embedding(grid)  -> [1, 1 + N, D] (row 0: the cls token's)
    (patch tokens + their position embedding, gathered or edited by the caller)
    prepend_cls(x, pos)       -> [B, 1 + M, D] with cls_token + pos[:, :1] in front
    encode(x, train)          -> the blocks, then the pooling / head below

  Output by `global_pool` (timm's names):
    ''       final-normed tokens [B, 1 + M, D] (cls first): the pretraining encoder.
    'token'  `norm` then the cls token [B, D] (the official linear probe's default).
    'avg'    mean of the patch tokens, then `fc_norm` [B, D]; there is no `norm` (the official
             fine-tuning default and timm's `global_pool='avg'`: the pretrained `norm` is dropped).
  With num_classes > 0 a `head` Dense (kernel normal(head_init_std), bias 0) follows the pooling.

  The position embedding is the fixed sin-cos constant (pretraining, as the official MAE), or with
  `learnable_pos_embed` a `pos_embed` parameter [1, 1 + N, D] initialized with it (fine-tuning:
  timm and the official fine-tuning code train it).
  """
  width: int
  depth: int
  num_heads: int
  patch_size: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  global_pool: str = ""
  num_classes: int = 0
  head_init_std: float = 2e-5
  learnable_pos_embed: bool = False
  compute: Compute = Compute()

  @classmethod
  def from_variant(cls, variant: str, **kwargs) -> "ViT":
    s = parse_variant(variant)
    return cls(width=s.width, depth=s.depth, num_heads=s.num_heads, patch_size=s.patch_size,
               mlp_ratio=s.mlp_ratio, **kwargs)

  def grid(self, image_hw) -> tuple[int, int]:
    h, w = image_hw
    return h // self.patch_size, w // self.patch_size

  def setup(self):
    if self.global_pool not in ("", "token", "avg"):
      raise ValueError(f"ViT global_pool must be '', 'token' or 'avg', got {self.global_pool!r}")
    if self.num_classes and not self.global_pool:
      raise ValueError("a ViT with num_classes > 0 needs global_pool 'token' or 'avg'")
    self.patch_embed = PatchEmbed(self.width, self.patch_size)
    # pos_embed, cls_token and the blocks live in the ViT's own scope (as in a compact module),
    # created on first use: the learnable pos_embed before cls_token, so their init RNGs (drawn
    # in order from this scope) are those of the unsplit encoder.
    if self.learnable_pos_embed:
      self._pos_embed = _OwnParam("pos_embed")
      nn.share_scope(self, self._pos_embed)
    self._cls_token = _OwnParam("cls_token")
    nn.share_scope(self, self._cls_token)
    self._blocks = _Blocks(self.depth, self.num_heads, self.mlp_ratio, self.drop_path_rate,
                           self.compute)
    nn.share_scope(self, self._blocks)
    if self.global_pool == "avg":
      self.fc_norm = nn.LayerNorm(epsilon=1e-6)
    else:
      self.norm = nn.LayerNorm(epsilon=1e-6)
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(self.head_init_std))

  def embed_patches(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] -> patch embeddings [B, N, D] (row-major), in the compute dtype."""
    return self.patch_embed(images.astype(self.compute.jnp_dtype))

  def position_embedding(self, grid: tuple[int, int]) -> jax.Array:
    """[1, 1 + gh*gw, D] float32 for the token grid (gh, gw), row 0 the cls token's: the sin-cos
    constant, or with learnable_pos_embed the `pos_embed` parameter it initializes."""
    pos = sincos_2d(self.width, *grid, cls_token=True)[None]
    if self.learnable_pos_embed:
      return self._pos_embed.create(lambda *_: jnp.asarray(pos), None)
    return pos

  def prepend_cls(self, x: jax.Array, pos: jax.Array) -> jax.Array:
    """x [B, M, D] (patch tokens with their position embedding) -> [B, 1 + M, D]: cls_token +
    pos[:, :1] in front, in x's dtype."""
    cls = self._cls_token.create(token_init, (1, 1, self.width))
    cls = (cls + pos[:, :1]).astype(x.dtype)
    return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)

  def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Tokens [B, 1 + M, D] (cls first) -> the blocks, then the output of `global_pool` and the
    head (see the class docstring)."""
    x = self._blocks.run(x, train)
    if self.global_pool == "avg":
      x = self.fc_norm(x[:, 1:].mean(axis=1))  # [B, D]
    else:
      x = self.norm(x)
      if self.global_pool == "token":
        x = x[:, 0]  # [B, D]
    if self.num_classes:
      x = self.head(x)
    return x

  def __call__(self, images: jax.Array, ids_keep: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    x = self.embed_patches(images)  # [B, N, D]
    pos = self.position_embedding(self.grid(images.shape[1:3]))  # [1, 1 + N, D]
    patch_pos = jnp.broadcast_to(pos[:, 1:], x.shape).astype(x.dtype)  # [B, N, D]
    if ids_keep is not None:
      x = gather_tokens(x, ids_keep)  # [B, N_vis, D]
      patch_pos = gather_tokens(patch_pos, ids_keep)
    x = self.prepend_cls(x + patch_pos, pos)
    return self.encode(x, train)
