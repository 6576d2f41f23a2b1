r"""Fine-tuning a pretrained encoder for classification (official MAE `main_finetune.py` recipe).

  python -m mae_jax.main --config=configs/finetune.py --workdir=DIR --config.init_from=PRETRAIN_WORKDIR

The model is the encoder of PRETRAIN_WORKDIR (any pretraining method of ours: its config.json says
which), initialized from its latest checkpoint (--config.init_step=N for another), with a new head.
Partial fine-tuning: --config.classifier.train_blocks=K trains only the last K blocks (plus the
final norm and the head). --config.random_init=True trains the same model from scratch.
Evaluates top-1 / top-5 on dataset.eval_split every epoch (config.evals.classification); the newest checkpoints are in
DIR/checkpoints, the best by top-1 in DIR/best, the summary in DIR/finetune.json.

Variants:
  digits (default)  the embedded digits after `configs/mae.py` (CPU, minutes).
  vit_b16           ImageNet, the paper's ViT-B recipe: batch 1024, 100 epochs, base_lr 5e-4
                    (x batch/256), layer decay 0.65, drop path 0.1, wd 0.05, warmup 5, RandAugment
                    m9 mstd0.5, label smoothing 0.1, random erasing 0.25, mixup 0.8, cutmix 1.0,
                    average pool + fc_norm; paper: 83.6 top-1 (not ours).
  vit_l16, vit_h14  as vit_b16 with 50 epochs, base_lr 1e-3, layer decay 0.75, drop path 0.2
                    (0.3 for H); paper: 85.9 / 86.9.
  convmae_base      ConvMAE-Base, fine-tuned as MAE ViT-B; paper: 85.0.
"""

from mae_jax import configlib

RECIPES = {  # variant -> (epochs, base_lr, layer_decay, drop_path_rate)
    "vit_b16": (100, 5e-4, 0.65, 0.1),
    "vit_l16": (50, 1e-3, 0.75, 0.2),
    "vit_h14": (50, 1e-3, 0.75, 0.3),
    "convmae_base": (100, 5e-4, 0.65, 0.1),
}


def get_config(arg: str | None = None):
  arg = arg or "digits"
  if arg != "digits" and arg not in RECIPES:
    raise ValueError(f"unknown variant {arg!r} of configs/finetune.py; choose one of "
                     f"{['digits'] + sorted(RECIPES)}")
  c = configlib.base_config()
  c.task = "finetune"
  c.init_from = ""  # a pretraining workdir (required).
  c.init_step = 0  # 0 = its latest checkpoint.
  c.random_init = False  # True: the same model without pretrained weights (the baseline).
  c.image_size = 224  # 0 = the pretraining run's.
  # Top-1 / top-5 on dataset.eval_split every epoch and at the end; the best keeps DIR/best.
  c.evals = configlib.classification_evals(batch_size=256)
  c.best_metric = "classification/top1"

  c.classifier = dict(
      pool="avg",  # 'avg' (mean of patch tokens + fc_norm) or 'cls' (norm, then the cls token).
      drop_path_rate=0.1,
      head_init_std=2e-5,
      train_blocks=-1,  # -1 = all; K = partial fine-tuning of the last K blocks.
  )
  c.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
  # timm's create_transform for training: RandomResizedCrop(scale=(0.08, 1)), flip, RandAugment,
  # normalize, random erasing (mode 'pixel'); eval: resize image_size / 0.875, centre crop.
  c.dataset.crop_min_scale = 0.08
  c.dataset.randaugment = "rand-m9-mstd0.5-inc1"  # '' = off.
  c.dataset.reprob = 0.25  # random erasing probability.

  c.batch_size = 1024
  c.num_epochs = 100.0
  c.warmup_epochs = 5.0
  c.optimizer.base_lr = 5e-4
  c.optimizer.min_lr = 1e-6
  c.optimizer.b2 = 0.999  # torch AdamW's default, as the official fine-tuning.
  c.optimizer.weight_decay = 0.05
  c.optimizer.layer_decay = 0.65
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2

  if arg == "digits":
    c.image_size = 0  # the pretraining run's (32 px for configs/mae.py's default).
    c.dataset.name = "mae_jax_digits"
    c.dataset.shuffle_buffer = 2000
    # Digits are tiny and not mirror-symmetric: milder crops, no flip, RandAugment at m5 (at m9 a
    # translation moves a 32 px digit by up to 13 px); mixup, cutmix and erasing as the recipe.
    c.dataset.crop_min_scale = 0.6
    c.dataset.hflip = False
    c.dataset.randaugment = "rand-m5-mstd0.5-inc1"
    c.batch_size = 128
    c.num_epochs = 15.0
    c.warmup_epochs = 1.0
    c.optimizer.base_lr = 2e-3
    c.optimizer.layer_decay = 0.75
    c.evals.classification.batch_size = 128
    c.checkpoint_every_steps = 100
    c.log_every_steps = 20
  else:
    epochs, base_lr, decay, drop_path = RECIPES[arg]
    configlib.imagenet_recipe(c)
    c.num_epochs = float(epochs)
    c.optimizer.base_lr = base_lr
    c.optimizer.layer_decay = decay
    c.classifier.drop_path_rate = drop_path
  return configlib.lock(c)
