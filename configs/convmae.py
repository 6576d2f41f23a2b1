r"""ConvMAE pretraining (Gao et al. 2022, "ConvMAE: Masked Convolution Meets Masked Autoencoders").

Variants (the part after ':' in --config):
  tiny (default)  CPU demo on the embedded digits: ConvViT size 'mu' (widths 32/64/128, depths
                  1/1/2) at 64 px, so the stage-3 grid is 4x4 (16 tokens, 4 kept); a few minutes
                  on 2 CPU cores.
  base            the paper's ImageNet recipe for ConvMAE-Base at 224 px (14x14 stage-3 grid):
                  widths 256/384/768, depths 2/2/11, 12 heads; decoder 512 wide x 8 blocks x 16
                  heads; mask 0.75, normalized-pixel loss, 1600 epochs, 40 warmup, base_lr 1.5e-4
                  (x batch/256), AdamW (0.9, 0.95), wd 0.05, batch 2048 (the authors' word).

CPU demo:
  python -m mae_jax.main --config=configs/convmae.py --workdir=/tmp/convmae_tiny

ConvMAE-Base on ImageNet (TPU VM or GPU box; tfds imagenet2012 prepared in DATA_DIR):
  python -m mae_jax.main --config=configs/convmae.py:base --workdir=gs://BUCKET/convmae_base \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
Paper (not ours): ConvMAE-Base, 1600 epochs: ImageNet fine-tune top-1 85.0, linear probe 70.9.
Any key can be overridden, e.g. --config.model.variant=base --config.num_epochs=800.
"""

from mae_jax import configlib

VARIANTS = ("tiny", "base")


def get_config(arg: str | None = None):
  arg = arg or "tiny"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/convmae.py; choose one of "
                     f"{list(VARIANTS)}")
  c = configlib.base_config()
  # model.variant: a size of mae_jax.models.convvit.SIZES ('mu', 'base'). model.dwconv_impl:
  # 'conv' (grouped convolution, for accelerators) or 'shifts' (the same function as 25 shifted
  # multiply-adds; about 1.5x faster training steps on CPU).
  c.update(method="convmae", mask_ratio=0.75, norm_pix_loss=True,
           model=dict(variant="base", drop_path_rate=0.0, dwconv_impl="conv",
                      decoder_width=512, decoder_depth=8, decoder_heads=16))

  if arg == "tiny":
    c.model.update(variant="mu", dwconv_impl="shifts", decoder_width=64, decoder_depth=2,
                   decoder_heads=4)
    c.dataset.update(name="mae_jax_digits", shuffle_buffer=2000)
    c.update(image_size=64, batch_size=128, num_epochs=20.0, warmup_epochs=2.0,
             checkpoint_every_steps=100, log_every_steps=20)
    c.optimizer.base_lr = 3e-3  # high for a short demo; the paper recipe keeps 1.5e-4.
  else:
    c.update(batch_size=2048, num_epochs=1600.0, warmup_epochs=40.0)  # image_size 224.
    configlib.imagenet_recipe(c)
  return configlib.lock(c)
