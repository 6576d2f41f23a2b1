r"""k-NN evaluation of a pretrained encoder (cosine, k = 20, temperature-weighted vote, T = 0.07).

  python -m mae_jax.main --config=configs/knn.py --workdir=DIR --config.init_from=PRETRAIN_WORKDIR

The model comes from PRETRAIN_WORKDIR/config.json and its latest checkpoint
(--config.init_step=N for another). Features of dataset.train_split are the memory, the score is
top-1 on dataset.eval_split, both through the eval transform (resize to image_size / 0.875,
centre crop). --config.random_init=True scores a freshly initialized encoder of the same model,
the baseline that pretraining must beat. Variants: default = the embedded digits;
`imagenet` = imagenet2012 (--config.dataset.data_dir=...).
"""

from mae_jax import configlib


def get_config(arg: str | None = None):
  arg = arg or "digits"
  if arg not in ("digits", "imagenet"):
    raise ValueError(f"unknown variant {arg!r} of configs/knn.py; choose 'digits' or 'imagenet'")
  c = configlib.lock(configlib.base_config())
  c.unlock()
  c.task = "knn"
  c.evals = {}  # the task is one evaluation; nothing runs during training.
  c.knn = dict(k=20, temperature=0.07, pool="")  # pool '' = the method's default.
  c.init_from = ""
  c.init_step = 0  # 0 = latest.
  c.random_init = False
  c.image_size = 0  # 0 = the pretraining run's.
  c.batch_size = 256  # feature-extraction batch.
  c.dataset.name = "mae_jax_digits" if arg == "digits" else "imagenet2012"
  return configlib.lock(c)
