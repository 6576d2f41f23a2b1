r"""MAE pretraining (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

Variants (the part after ':' in --config):
  tiny (default)  CPU demo on the embedded digits: a 4-block ViT at 32 px; a few minutes on 2 cores.
  vit_ti16, vit_s16, vit_b16, vit_l16, vit_h14   the official ImageNet recipe at 224 px:
                  batch 4096, 800 epochs, 40 warmup, base_lr 1.5e-4 (x batch/256), AdamW (0.9, 0.95),
                  wd 0.05, mask 0.75, normalized-pixel loss, decoder 512 wide x 8 blocks x 16 heads.

CPU demo:
  python -m mae_jax.main --config=configs/mae.py --workdir=/tmp/mae_tiny

ViT-B/16 on ImageNet (TPU VM or GPU box; tfds imagenet2012 prepared in DATA_DIR):
  python -m mae_jax.main --config=configs/mae.py:vit_b16 --workdir=gs://BUCKET/mae_b16 \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
Paper (not ours): fine-tuned top-1 83.6 (B/16), 85.9 (L/16), 86.9 (H/14); linear probe 68.0 / 75.8 / 76.6.
Keys are overridden with --config.KEY=VALUE, e.g. --config.mask_ratio=0.6 --config.num_epochs=1600;
k-NN during pretraining: --config.evals.knn.every_steps=5000.
"""

from mae_jax import configlib

VARIANTS = {
    "vit_ti16": "Ti/16",
    "vit_s16": "S/16",
    "vit_b16": "B/16",
    "vit_l16": "L/16",
    "vit_h14": "H/14",
}


def get_config(arg: str | None = None):
  arg = arg or "tiny"
  if arg != "tiny" and arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/mae.py; choose one of "
                     f"{['tiny'] + sorted(VARIANTS)}")
  c = configlib.base_config()
  c.method = "mae"
  c.mask_ratio = 0.75
  c.norm_pix_loss = True
  c.model = dict(variant="B/16", drop_path_rate=0.0,
                 decoder_width=512, decoder_depth=8, decoder_heads=16)

  if arg == "tiny":
    c.model.variant = "Mu/4"  # 128 wide, 4 blocks, 4 heads; 64 patches at 32 px.
    c.model.decoder_width = 64
    c.model.decoder_depth = 2
    c.model.decoder_heads = 4
    c.image_size = 32
    c.dataset.name = "mae_jax_digits"
    c.dataset.shuffle_buffer = 2000
    c.batch_size = 128
    c.num_epochs = 40.0
    c.warmup_epochs = 4.0
    c.optimizer.base_lr = 3e-3  # high for a short demo; the paper recipes keep 1.5e-4.
    c.checkpoint_every_steps = 100
    c.log_every_steps = 20
    # Held-out loss on the 300 validation digits (2 batches) and 8 reconstructions in TensorBoard
    # every 100 steps and at the end: a few seconds of a run of minutes.
    c.evals.heldout.every_steps = 100
  else:
    c.model.variant = VARIANTS[arg]
    configlib.imagenet_recipe(c)
  return configlib.lock(c)
