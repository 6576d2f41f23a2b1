r"""SplitMask pretraining (El-Nouby et al. 2021, "Are Large-scale Datasets Necessary for
Self-Supervised Pre-training?"): pretraining on the target dataset alone.

Variants (the part after ':' in --config):
  tiny (default)  CPU demo on the embedded digits: a 4-block ViT (Mu/4) at 32 px (64 patches,
                  32 per half), decoder 64 wide x 2 blocks; a few minutes on 2 CPU cores.
  vit_b16         ViT-B/16 at 224 px, decoder 512 wide x 2 blocks x 16 heads (the paper's shallow
                  2-layer decoder). The optimizer is BEiT's ImageNet recipe, which SplitMask builds
                  on (batch 2048, lr 1.5e-3 per 2048 = base_lr 1.875e-4 per 256, AdamW (0.9, 0.999),
                  wd 0.05, 10 warmup, drop path 0.1, 800 epochs): we could not confirm the paper's
                  own table offline. InfoNCE tau 0.2, weight 1: our choice.

CPU demo:
  python -m mae_jax.main --config=configs/splitmask.py --workdir=/tmp/splitmask_tiny

The paper's use: pretrain on the target dataset only, e.g. a folder of images (one sub-folder per
class, or flat):
  python -m mae_jax.main --config=configs/splitmask.py:vit_b16 --workdir=DIR \
      --config.dataset.name=folder --config.dataset.folder=/data/stanford_cars \
      --config.batch_size=512 --config.num_epochs=EPOCHS  # a small set: many epochs
Targets are pixels (MAE's normalized-pixel loss), not BEiT visual tokens (not downloadable here).
"""

from mae_jax import configlib

VARIANTS = ("tiny", "vit_b16")


def get_config(arg: str | None = None):
  arg = arg or "tiny"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/splitmask.py; choose one of "
                     f"{list(VARIANTS)}")
  c = configlib.base_config()
  c.update(method="splitmask", norm_pix_loss=True, nce_temperature=0.2, nce_weight=1.0,
           model=dict(variant="B/16", drop_path_rate=0.1,
                      decoder_width=512, decoder_depth=2, decoder_heads=16))
  c.optimizer.update(b2=0.999, weight_decay=0.05)

  if arg == "tiny":
    c.model.update(variant="Mu/4", drop_path_rate=0.0, decoder_width=64, decoder_heads=4)
    c.dataset.update(name="mae_jax_digits", shuffle_buffer=2000)
    c.update(image_size=32, batch_size=128, num_epochs=10.0, warmup_epochs=1.0,
             checkpoint_every_steps=100, log_every_steps=20)
    c.optimizer.base_lr = 2e-3  # high for a short demo.
  else:
    configlib.imagenet_recipe(c)
    c.update(batch_size=2048, num_epochs=800.0, warmup_epochs=10.0)  # image_size 224.
    c.optimizer.base_lr = 1.875e-4  # BEiT's 1.5e-3 per 2048 images, as our lr is per 256.
  return configlib.lock(c)
