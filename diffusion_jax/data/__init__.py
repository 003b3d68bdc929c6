"""Training data: deterministic, checkpointable iterators yielding this process's share of each batch.

* ``toy2d``: 2-D sets generated in JAX from ``fold_in(seed, step)`` (state = the step).
* ``digits``: scikit-learn's 8x8 digits through the offline tfds builder in :mod:`.digits`
  (prepared automatically under ``data_dir`` on first use), read with ``tfds.data_source`` + grain.
* ``cifar10``, ``celeb_a_hq``: tfds ``data_source`` (ArrayRecord) + grain from a prepared ``data_dir``
  (CelebA-HQ from tfds' manual download). A missing set raises ``FileNotFoundError`` naming the
  directory to fill and the command that fills it.

Images are mapped to [-1, 1]: x = 2 v / (levels - 1) - 1 with ``levels`` grey levels (17 for digits,
256 otherwise). Host-count invariance: global batch b is the same examples in the same order whatever
the number of processes P; process p reads its contiguous block, rows [p L, (p + 1) L) with L = G / P
(``jax.make_array_from_process_local_data`` puts the blocks side by side), so 1 x 8 and 2 x 4 devices
see identical global batches. Each process's iterator state (a JSON dict) goes into every checkpoint
(grain's checkpoint handler: one file per process), so resuming continues the same order.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from diffusion_jax.data.toy import TOY_MIXTURES, TOY_SAMPLERS, toy_sample

Array = Any

_TFDS_NAMES = {"digits": "sklearn_digits", "cifar10": "cifar10", "celeb_a_hq": "celeb_a_hq/256"}
_LEVELS = {"digits": 17, "cifar10": 256, "celeb_a_hq": 256}
_SHAPES = {"digits": (8, 8, 1), "cifar10": (32, 32, 3), "celeb_a_hq": (256, 256, 3)}


def data_shape(config) -> tuple[int, ...]:
    """The shape of one example: (2,) for toy sets, (H, W, C) for images."""
    if config.data.dataset == "toy2d":
        return (2,)
    return _SHAPES[config.data.dataset]


def levels(dataset: str) -> int:
    """Number of grey levels of an image set (for dequantisation and bits/dim)."""
    return _LEVELS[dataset]


def default_data_dir(config) -> str:
    return config.data.data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
        "~/tensorflow_datasets")


def to_model_space(images: np.ndarray, dataset: str) -> np.ndarray:
    """uint8 images with ``levels`` values -> float32 in [-1, 1]."""
    return images.astype(np.float32) * (2.0 / (levels(dataset) - 1)) - 1.0


def to_image_space(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 1] (clipped), for plotting and feature extractors."""
    return np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)


class ToyIterator:
    """2-D toy batches: batch i is ``toy_sample(name, fold_in(key(seed), i), global_batch)``."""

    def __init__(self, name: str, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if name not in TOY_SAMPLERS:
            raise ValueError(f"unknown toy data set {name!r}; choose one of {sorted(TOY_SAMPLERS)}")
        self.name, self.global_batch, self.seed = name, global_batch, seed
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.step = 0
        self._draw = jax.jit(lambda key: toy_sample(name, key, global_batch))

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        x = self._draw(jax.random.fold_in(jax.random.PRNGKey(self.seed), self.step))
        self.step += 1
        return np.asarray(x)[self.offset:self.offset + self.local]

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def tfds_source(dataset: str, split: str, data_dir: str, manual_dir: str = ""):
    """A random-access tfds source, preparing the embedded digits set offline when needed."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.registered import DatasetNotFoundError
    name = _TFDS_NAMES[dataset]
    if dataset == "digits":
        from diffusion_jax.data import digits
        if jax.process_count() > 1:          # one process builds the files, the others wait for it
            from jax.experimental import multihost_utils
            if jax.process_index() == 0:
                digits.prepare(data_dir)
            multihost_utils.sync_global_devices(f"diffusion_jax digits prepared in {data_dir}")
        digits.prepare(data_dir)
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    # what tfds raises for data that is missing, or not prepared in a random-access format (array_record)
    except (DatasetNotFoundError, AssertionError, FileNotFoundError, NotImplementedError) as e:
        if dataset == "celeb_a_hq":
            hint = (f"put the CelebA-HQ files that tfds' celeb_a_hq documents into the manual dir "
                    f"({manual_dir or '<data_dir>/downloads/manual'}) and run `tfds build celeb_a_hq/256 "
                    f"--data_dir {data_dir} --manual_dir <dir> --file_format array_record`")
        else:
            hint = (f"prepare it on a machine with internet with `tfds build {name} --data_dir <dir> "
                    f"--file_format array_record` and copy <dir> to {data_dir} (or set "
                    f"config.data.data_dir / TFDS_DATA_DIR)")
        raise FileNotFoundError(f"data set {name!r} (split {split!r}) not found in data_dir "
                                f"{data_dir!r}: {hint}") from e


# Read-ahead of the image pipeline: batches buffered, and the threads that fill the buffer.
PREFETCH_BATCHES = 4
PREFETCH_THREADS = 4


class ImageIterator:
    """grain pipeline over a tfds source: shuffle(seed) -> repeat -> [flip] -> this process's block -> batch.

    Element i of process p's stream is element (i // L) G + p L + (i mod L) of the global stream, so
    its b-th local batch is rows [p L, (p + 1) L) of global batch b. Random flips are drawn per global
    index (grain's ``random_map`` seeds by index), so they do not depend on the process count either.
    """

    def __init__(self, source, dataset: str, global_batch: int, seed: int, random_flip: bool = False,
                 process_index: int = 0, process_count: int = 1):
        import sys

        import grain
        self.dataset = dataset
        ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)

        def convert(record):
            return to_model_space(np.asarray(record["image"]), dataset)

        if random_flip:
            def flip(record, rng: np.random.Generator):
                x = convert(record)
                return x[:, ::-1] if rng.random() < 0.5 else x
            ds = ds.random_map(flip, seed=seed + 1)
        else:
            ds = ds.map(convert)
        local = global_batch // process_count
        offset = process_index * local

        def read(i: int):
            b, j = divmod(i, local)
            return ds[b * global_batch + offset + j]

        blocks = grain.MapDataset.range((sys.maxsize // global_batch) * local).map(read)
        self._ds = blocks.batch(local, drop_remainder=True)
        # grain's default read-ahead is 500 elements (here: batches) on 16 threads: a short run spent ~40 % of
        # its CPU reading batches it never used, and a CIFAR-10 run would hold ~0.8 GB of them. A few batches
        # ahead keeps the accelerator fed (the state saved for resumption is the next index either way).
        options = grain.ReadOptions(num_threads=PREFETCH_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
        self._it = iter(self._ds.to_iter_dataset(options))

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return np.asarray(next(self._it), dtype=np.float32)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)


class Checkpointable:
    """An iterator as grain's orbax checkpoint handler expects it (JSON bytes; one file per process)."""

    def __init__(self, iterator):
        self.iterator = iterator

    def get_state(self) -> bytes:
        import json
        return json.dumps(self.iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        import json
        self.iterator.set_state(json.loads(state.decode() if isinstance(state, bytes) else state))

    def start_prefetch(self) -> None:
        pass


def make_iterator(config, global_batch: int, *, split: str | None = None, seed: int | None = None,
                  process_index: int | None = None, process_count: int | None = None):
    """The training iterator a config asks for (``split`` defaults to ``config.data.split``)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    seed = config.seed if seed is None else seed
    if global_batch % process_count:
        raise ValueError(f"config.training.batch_size={global_batch} is not divisible by the {process_count} "
                         f"processes: use a multiple of {process_count}")
    if config.data.dataset == "toy2d":
        return ToyIterator(config.data.toy_name, global_batch, seed, process_index, process_count)
    source = tfds_source(config.data.dataset, split or config.data.split, default_data_dir(config),
                         config.data.manual_dir)
    return ImageIterator(source, config.data.dataset, global_batch, seed, config.data.random_flip,
                         process_index, process_count)


def load_split(config, split: str, limit: int | None = None) -> np.ndarray:
    """A whole split (or its first ``limit`` examples) in model space, for evaluation."""
    if config.data.dataset == "toy2d":
        n = limit or 10_000
        return np.asarray(toy_sample(config.data.toy_name, jax.random.PRNGKey(10_007), n))
    source = tfds_source(config.data.dataset, split, default_data_dir(config), config.data.manual_dir)
    n = len(source) if limit is None else min(limit, len(source))
    return np.stack([to_model_space(np.asarray(source[i]["image"]), config.data.dataset)
                     for i in range(n)])


__all__ = ["ToyIterator", "ImageIterator", "Checkpointable", "make_iterator", "load_split", "data_shape", "levels",
           "to_model_space", "to_image_space", "tfds_source", "TOY_SAMPLERS", "TOY_MIXTURES"]
