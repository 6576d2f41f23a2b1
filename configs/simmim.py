r"""SimMIM pretraining (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling").

Variants (the part after ':' in --config):
  tiny (default)  CPU demo on the embedded digits: a 4-block ViT (Mu/4) at 32 px, mask patches of
                  8 px (a 4x4 mask grid, 10 of 16 cells masked = 40 of 64 tokens); a few minutes
                  on 2 CPU cores.
  vit_b16         the paper's ViT-B recipe at 224 px: mask patch 32 (7x7 cells, 30 masked),
                  ratio 0.6, batch 2048, 800 epochs, 10 warmup, lr 1e-4 per 512 images (base_lr
                  5e-5 per 256 here), AdamW (0.9, 0.999), wd 0.05, clip 5.0, drop path 0.1,
                  RandomResizedCrop scale (0.67, 1) + flip. Our schedule is cosine where the
                  official one steps x0.1 at epoch 700; our ViT keeps the sin-cos position
                  embedding and has no relative position bias or layer scale.

CPU demo:
  python -m mae_jax.main --config=configs/simmim.py --workdir=/tmp/simmim_tiny

ViT-B/16 on ImageNet (TPU VM or GPU box; tfds imagenet2012 prepared in DATA_DIR):
  python -m mae_jax.main --config=configs/simmim.py:vit_b16 --workdir=gs://BUCKET/simmim_b16 \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
Paper (not ours): ViT-B/16, 800 epochs: ImageNet fine-tune top-1 83.8.
Block-wise masking on the mask-cell grid: --config.masking=block.
"""

from mae_jax import configlib

VARIANTS = ("tiny", "vit_b16")


def get_config(arg: str | None = None):
  arg = arg or "tiny"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/simmim.py; choose one of "
                     f"{list(VARIANTS)}")
  c = configlib.base_config()
  c.update(method="simmim", mask_patch_size=32, mask_ratio=0.6,
           model=dict(variant="B/16", drop_path_rate=0.1))
  # SimMIM's optimizer: AdamW (0.9, 0.999), wd 0.05, clip 5.0.
  c.optimizer.update(b2=0.999, weight_decay=0.05, grad_clip_norm=5.0)
  c.dataset.crop_min_scale = 0.67

  if arg == "tiny":
    c.model.update(variant="Mu/4", drop_path_rate=0.0)
    c.mask_patch_size = 8
    c.dataset.update(name="mae_jax_digits", shuffle_buffer=2000)
    c.update(image_size=32, batch_size=128, num_epochs=10.0, warmup_epochs=1.0,
             checkpoint_every_steps=100, log_every_steps=20)
    c.optimizer.base_lr = 2e-3  # high for a short demo; the paper recipe keeps 1e-4 per 512.
  else:
    configlib.imagenet_recipe(c)
    c.update(batch_size=2048, num_epochs=800.0, warmup_epochs=10.0)  # image_size 224.
    c.optimizer.base_lr = 5e-5  # the official 1e-4 per 512 images, as our lr is per 256.
  return configlib.lock(c)
