"""A tiny TFDS dataset written to a temporary data_dir (array_record, no TensorFlow, no network)."""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds

NAME = "tiny_corpus"
SPLITS = {"train": 300, "validation": 60}


def document(split: str, index: int) -> str:
    """Document ``index`` of ``split``: a few English-like sentences, different per split."""
    rng = np.random.default_rng((len(split), index))
    subjects = ["the cat", "a dog", "my sister", "the old man", "our teacher", "a small bird"]
    verbs = ["sees", "likes", "finds", "follows", "draws", "calls"]
    objects = ["the ball", "a red apple", "the river", "her friend", "the garden", "a letter"]
    return " ".join(
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.".capitalize()
        for _ in range(rng.integers(2, 5))
    )


class TinyCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents with a text field ``body`` (not the default ``text``) and an integer id."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"body": tfds.features.Text(), "id": np.int32})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        for index in range(SPLITS[split]):
            yield index, {"body": document(split, index), "id": index}


def prepare(data_dir: pathlib.Path) -> pathlib.Path:
    """Writes the dataset under ``data_dir`` (as ``tfds build`` would) and returns data_dir."""
    TinyCorpus(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir
