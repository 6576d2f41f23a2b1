"""Input pipelines: tensorflow-datasets by name, a folder of images, or the embedded digits.

`get_source(config.dataset)` finds the data (and prepares the embedded default on first use);
`train_batches` / `eval_batches` turn a source into numpy batches for one process.
"""

from mae_jax.data.pipeline import (
    Source,
    eval_batches,
    eval_steps,
    get_source,
    normalize_on_device,
    steps_per_epoch,
    train_batches,
)

__all__ = ["Source", "eval_batches", "eval_steps", "get_source", "normalize_on_device",
           "steps_per_epoch", "train_batches"]
