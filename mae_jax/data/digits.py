"""`mae_jax_digits`: the embedded default dataset, for trying the pipeline.

The 1797 real 8x8 handwritten digits that ship inside scikit-learn
(`sklearn.datasets.load_digits`), wrapped as a tensorflow-datasets builder so the
whole training loop runs offline, with no download and no manual preparation.
It is for smoke tests and for trying the code, not for results: 8x8 images are
far too small for masked image modeling to learn anything meaningful.

Splits are deterministic: `validation` is every 6th example (index % 6 == 0,
300 images) and `train` is the other 1497.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

_DESCRIPTION = (
    "scikit-learn's bundled 8x8 handwritten digits (values 0..16 rescaled to "
    "0..255), as a tfds dataset for trying the mae_jax pipeline offline.")

_CITATION = """\
@misc{uci_optdigits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
}"""

# Every VALIDATION_EVERY-th example (by index in load_digits) is held out.
VALIDATION_EVERY = 6


class MaeJaxDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits as an offline tfds dataset (name `mae_jax_digits`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.x derives this through `importlib_resources`, a package it no longer
    # installs on Python >= 3.9, and `download_and_prepare` needs it (to look for a
    # checksums.tsv, which this builder has no use for: it downloads nothing).
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo is built directly (not via dataset_info_from_configs) so tfds does
    # not look for README/CITATIONS/checksums files next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    return {
        "train": self._generate_examples(validation=False),
        "validation": self._generate_examples(validation=True),
    }

  def _generate_examples(self, validation: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    # Imported here so that importing mae_jax.data stays cheap.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    images = np.rint(digits.images.astype(np.float64) * (255.0 / 16.0))
    images = np.clip(images, 0, 255).astype(np.uint8)[..., None]
    for index, (image, label) in enumerate(zip(images, digits.target)):
      if (index % VALIDATION_EVERY == 0) == validation:
        yield index, {"image": image, "label": int(label)}
