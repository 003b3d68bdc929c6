"""The embedded offline data set: scikit-learn's 8x8 handwritten digits as a tensorflow-datasets builder.

scikit-learn ships the 1,797 UCI optical-recognition digits inside its wheel, so this builder prepares
with no network: ``tfds.builder("sklearn_digits", data_dir=...).download_and_prepare()`` writes
ArrayRecord files that :func:`tfds.data_source` reads like any other tfds set. Images are 8x8x1
``uint8`` with values 0..16 (17 grey levels); the split is deterministic (train: the first 1,500,
test: the remaining 297, in the file's order).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 1500
LEVELS = 17          # pixel values 0..16


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits (UCI ML hand-written digits, 8x8, 17 grey levels)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: train = first 1500 images, test = last 297."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's copy of the UCI optical recognition of handwritten digits "
                        "test set: 1797 images of 8x8 pixels with values 0..16.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager                      # nothing to download: the data ships with scikit-learn
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = digits.images.astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int64)
        return {
            "train": self._generate_examples(images[:NUM_TRAIN], labels[:NUM_TRAIN], 0),
            "test": self._generate_examples(images[NUM_TRAIN:], labels[NUM_TRAIN:], NUM_TRAIN),
        }

    def _generate_examples(self, images, labels, offset):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield offset + i, {"image": image, "label": int(label)}


def prepare(data_dir: str) -> None:
    """Prepare the ArrayRecord files under ``data_dir`` (offline; a no-op when already there)."""
    SklearnDigits(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
