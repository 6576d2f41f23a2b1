r"""TinyMIM distillation (Ren et al. 2023, "TinyMIM: An Empirical Study of Distilling MIM
Pre-trained Models"): a frozen MIM-pretrained ViT teacher, a small ViT student, relation targets.

config.teacher.workdir is required: a pretraining workdir of ours (any ViT method), an official
PyTorch MAE release imported with `python -m mae_jax.convert import --src=FILE --workdir=DIR`, or
a TinyMIM workdir (its student is the teacher: the sequential chain).

Variants (the part after ':' in --config):
  tiny (default)  CPU demo on the embedded digits: student Nano/4 (64 wide, 4 blocks, 2 heads) at
                  32 px distilled from the last block of a Mu/4 MAE teacher (configs/mae.py's
                  default, 4 heads), 40 epochs (440 steps of 128).
  vit_b16         the paper's recipe at 224 px: student ViT-B/16 from block 18 of 24 of an MAE
                  ViT-L/16 teacher; 300 epochs, batch 4096, base_lr 1.5e-4 (x batch/256), warmup 15,
                  AdamW (0.9, 0.95), wd 0.05, drop path 0.1, ColorJitter 0.4 on the student's copy.
  vit_s16         the same recipe, ViT-S/16 from the last block of TinyMIM-B.
  vit_t16         the same recipe, ViT-Ti/16 from the last block of TinyMIM-S.
The paper variants run the teacher in bfloat16 (config.teacher.dtype); the demo in float32.

CPU demo (after `python -m mae_jax.main --config=configs/mae.py --workdir=/tmp/mae_tiny`):
  python -m mae_jax.main --config=configs/tinymim.py --workdir=/tmp/tinymim_tiny \
      --config.teacher.workdir=/tmp/mae_tiny

The sequential chain on ImageNet (launch/tinymim_chain.sh runs the four steps in order):
  python -m mae_jax.convert import --src=mae_pretrain_vit_large.pth --workdir=gs://B/mae_l16
  python -m mae_jax.main --config=configs/tinymim.py:vit_b16 --workdir=gs://B/tinymim_b16 \
      --config.teacher.workdir=gs://B/mae_l16 --config.dataset.data_dir=gs://B/tensorflow_datasets
  python -m mae_jax.main --config=configs/tinymim.py:vit_s16 --workdir=gs://B/tinymim_s16 \
      --config.teacher.workdir=gs://B/tinymim_b16 --config.dataset.data_dir=...
  python -m mae_jax.main --config=configs/tinymim.py:vit_t16 --workdir=gs://B/tinymim_t16 \
      --config.teacher.workdir=gs://B/tinymim_s16 --config.dataset.data_dir=...
Paper (not ours), ImageNet fine-tune top-1: ViT-T 75.8 (MAE 71.6), ViT-S 83.0 (MAE 80.6),
ViT-B 85.0 (MAE 83.6).
"""

from mae_jax import configlib

# variant -> (student, teacher layer: 1-based, 0 = the last block)
VARIANTS = {
    "vit_b16": ("B/16", 18),  # from MAE ViT-L/16 (24 blocks): block 18, the paper's choice.
    "vit_s16": ("S/16", 0),  # from TinyMIM-B: its last block.
    "vit_t16": ("Ti/16", 0),  # from TinyMIM-S: its last block.
}


def get_config(arg: str | None = None):
  arg = arg or "tiny"
  if arg != "tiny" and arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/tinymim.py; choose one of "
                     f"{['tiny'] + sorted(VARIANTS)}")
  c = configlib.base_config()
  c.method = "tinymim"
  c.model = dict(variant="B/16", drop_path_rate=0.1)  # the student.
  # workdir: the teacher's pretraining workdir (required); step: its checkpoint (0 = latest);
  # layer: the teacher block whose relations are the targets (1-based, 0 = last); dtype: the
  # teacher's compute and storage type ('float32' or 'bfloat16').
  c.teacher = dict(workdir="", step=0, layer=0, dtype="bfloat16")
  # Comma-separated: 'relation' (Q-K and V-V relations, the paper's), 'feature' (patch tokens),
  # 'cls' (cls token); several add up, each logged as loss_<name> (loss_qk, loss_vv for relations).
  c.targets = "relation"
  c.color_jitter = 0.4  # ColorJitter(b, c, s) strength on the student's copy only; 0 = off.
  c.update(batch_size=4096, num_epochs=300.0, warmup_epochs=15.0)  # base_lr 1.5e-4, wd 0.05.

  if arg == "tiny":
    c.model.update(variant="Nano/4", drop_path_rate=0.0)
    c.teacher.dtype = "float32"
    c.image_size = 32
    c.dataset.update(name="mae_jax_digits", shuffle_buffer=2000)
    c.update(batch_size=128, num_epochs=40.0, warmup_epochs=4.0, checkpoint_every_steps=100,
             log_every_steps=20)
    c.optimizer.base_lr = 3e-3  # high for a short demo, as configs/mae.py's; the paper: 1.5e-4.
  else:
    c.model.variant, c.teacher.layer = VARIANTS[arg]
    configlib.imagenet_recipe(c)  # image_size 224.
  return configlib.lock(c)
