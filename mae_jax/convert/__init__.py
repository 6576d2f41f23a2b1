"""Checkpoint conversion between our Orbax checkpoints and PyTorch (timm, official MAE / ConvMAE).

  python -m mae_jax.convert export --workdir=W [--step=N] [--format=timm|mae|convmae] --out=F
  python -m mae_jax.convert import --src=F --workdir=OUT [--arch=auto|mae|convmae|timm]

`layout` maps parameter trees to state_dicts and back (pure numpy, no torch); `files` reads and
writes .safetensors and weights-only .pth files (torch is imported lazily, only for .pth);
`workdirs` connects both to Orbax workdirs. Nothing else in mae_jax imports torch.
"""

from mae_jax.convert.layout import ConversionError, export_state_dict, import_state_dict
from mae_jax.convert.workdirs import export_workdir, import_checkpoint

__all__ = ["ConversionError", "export_state_dict", "import_state_dict", "export_workdir",
           "import_checkpoint"]
