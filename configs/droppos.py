r"""DropPos pretraining (Wang et al. 2023, "DropPos: Pre-Training Vision Transformers by
Reconstructing Dropped Positions").

Variants (the part after ':' in --config):
  tiny (default)  CPU demo on the embedded digits: a 4-block ViT (Mu/4) at 32 px (64 patches, 16
                  visible, 12 of them without position), decoder 64 wide x 2 blocks; a few minutes
                  on 2 CPU cores.
  vit_b16         the official ViT-B/16 recipe at 224 px: mask 0.75 (49 visible), position drop
                  0.75 (37 of 49), decoder 512 wide x 2 blocks x 16 heads without position
                  embedding, sigma 1 -> 0, attentive reconstruction tau 0.1; 800 epochs, 10 warmup,
                  base_lr 1.5e-4 (x batch/256), AdamW (0.9, 0.95), wd 0.05, clip 5.0; batch 4096
                  (MAE's; not in our notes of the official code).

CPU demo:
  python -m mae_jax.main --config=configs/droppos.py --workdir=/tmp/droppos_tiny

ViT-B/16 on ImageNet (TPU VM or GPU box; tfds imagenet2012 prepared in DATA_DIR):
  python -m mae_jax.main --config=configs/droppos.py:vit_b16 --workdir=gs://BUCKET/droppos_b16 \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
Paper (not ours): ViT-B/16 fine-tune top-1 83.0 (200 epochs), 84.2 (800 epochs); ViT-L/16 85.8.
"""

from mae_jax import configlib

VARIANTS = ("tiny", "vit_b16")


def get_config(arg: str | None = None):
  arg = arg or "tiny"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/droppos.py; choose one of "
                     f"{list(VARIANTS)}")
  c = configlib.base_config()
  # sigma: the position-smoothing sigma at the start (grid cells), decayed linearly to 0;
  # attentive_tau: temperature of the [CLS] affinity weights (0 = every dropped token weighs 1).
  c.update(method="droppos", mask_ratio=0.75, pos_mask_ratio=0.75, sigma=1.0, attentive_tau=0.1,
           model=dict(variant="B/16", drop_path_rate=0.0,
                      decoder_width=512, decoder_depth=2, decoder_heads=16))
  c.optimizer.grad_clip_norm = 5.0

  if arg == "tiny":
    c.model.update(variant="Mu/4", decoder_width=64, decoder_heads=4)
    c.dataset.update(name="mae_jax_digits", shuffle_buffer=2000)
    c.update(image_size=32, batch_size=128, num_epochs=20.0, warmup_epochs=2.0,
             checkpoint_every_steps=100, log_every_steps=20)
    c.optimizer.base_lr = 2e-3  # high for a short demo; the paper recipe keeps 1.5e-4.
  else:
    configlib.imagenet_recipe(c)
    c.update(batch_size=4096, num_epochs=800.0, warmup_epochs=10.0)  # image_size 224.
  return configlib.lock(c)
