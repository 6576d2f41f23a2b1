"""Benchmarks behind `python -m mae_jax.bench` (see __main__.py for the command lines).

  step.py         the train step on synthetic images: img/s, compile time, FLOP/s against a
                  measured matmul peak, XLA's memory plan; batch sweeps
  input.py        the training input alone (read, decode, crop, resize, flip, normalize, batch,
                  to the device) against the official MAE input (torchvision) on the same files
  loop.py         the whole training loop on real images against the step alone
  torch_peer.py   the same MAE step in PyTorch (the official model, or Hugging Face's ViTMAE),
                  timed in a subprocess of the same run
  profile.py      where one step's time goes on a CPU, by kernel and model part
  accelerator.py  the accelerator report: MAE ViT-B/16 and ViT-L/16 in bfloat16 (img/s and MFU
                  at several batch sizes, compile time with and without scan, memory with and
                  without remat) as a markdown block; `--dry` runs it on a tiny model (CPU)
"""
