"""TFDS builders for effattn's tasks, written without TensorFlow.

The only module of effattn.data that imports tensorflow_datasets (pipeline.load_split imports it
lazily). `make_builder` turns a task's `BuildSpec` (spec.py) into a
`tfds.core.GeneratorBasedBuilder` whose config name is derived from everything that changes the
data, so two option sets never share a directory under data_dir:

    <data_dir>/effattn_<task>/<readable fields>_<hash>/<version>/*.array_record-*
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os

from absl import logging
import tensorflow_datasets as tfds

from effattn.data import spec as spec_lib
from effattn.data.spec import BuildSpec


class _EffattnBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder driven by a BuildSpec (one subclass per task, for its name)."""

  VERSION = tfds.core.Version("1.0.0")
  # No checksums or metadata files live next to this code; None also keeps TFDS from probing
  # package resources (which needs importlib_resources on some installs).
  code_path = None

  def __init__(self, *, spec: BuildSpec, data_dir: str):
    self._spec = spec
    super().__init__(data_dir=data_dir, config=spec.config_name)

  def _info(self):
    features = tfds.features.FeaturesDict({
        name: tfds.features.Tensor(shape=shape, dtype=dtype)
        for name, (shape, dtype) in self._spec.features.items()
    })
    # Order on disk = generation order, so source[i] is the i-th example drawn.
    return tfds.core.DatasetInfo(
        builder=self, description=self._spec.description, features=features,
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(identity=dict(self._spec.identity)))

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated or read locally
    return {split: self._generate_examples(split) for split in self._spec.split_names}

  def _generate_examples(self, split):
    yield from enumerate(spec_lib.split_examples(self._spec, split))


@functools.cache
def _builder_class(task: str, config_name: str, version: str, description: str) -> type:
  # TFDS names the on-disk folder after the class's `name`: one name per task keeps tasks apart.
  # Listing the config in BUILDER_CONFIGS keeps TFDS from warning about a "custom" config.
  config = tfds.core.BuilderConfig(name=config_name, version=version, description=description)
  return type(f"Effattn{task.title().replace('_', '')}", (_EffattnBuilder,),
              {"name": f"effattn_{task}", "BUILDER_CONFIGS": [config],
               "VERSION": tfds.core.Version(version), "__module__": __name__},
              skip_registration=True)


def make_builder(spec: BuildSpec, data_dir: str):
  """Returns the TFDS builder of `spec` rooted at data_dir (nothing is generated yet)."""
  cls = _builder_class(spec.task, spec.config_name, spec.version, spec.description)
  return cls(spec=spec, data_dir=data_dir)


@contextlib.contextmanager
def _file_lock(path: str):
  # Several processes (a parallel sweep, several hosts sharing a disk) may ask for the same
  # data at once: one prepares it, the others wait and then reuse it.
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(builder, data_dir: str):
  """Generates the builder's data as array_record under data_dir unless it is already there.

  Returns a builder whose info describes the prepared data (a builder made before another
  process finished preparing would still describe no splits).
  """
  if not _is_prepared(builder):  # reading needs no lock, so a read-only data_dir works
    os.makedirs(data_dir, exist_ok=True)
    lock = os.path.join(data_dir, f".{builder.name}.{builder.builder_config.name}.lock")
    with _file_lock(lock):
      if not _is_prepared(builder):
        _refuse_damaged(builder)
        logging.info("Preparing %s/%s into %s (first use)", builder.name,
                     builder.builder_config.name, builder.data_dir)
        builder.download_and_prepare(file_format="array_record")
        return builder
  if not builder.info.splits:
    return make_builder(builder._spec, data_dir)
  return builder


def _is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def _refuse_damaged(builder) -> None:
  # TFDS prepares into an `incomplete.*` folder and renames it when done: a version folder
  # without dataset_info.json lost it afterwards, and TFDS would reuse it as a dataset with no
  # splits. Deleting it is the user's call (it may be the only copy of prepared data).
  folder = str(builder.data_dir)
  if os.path.isdir(folder) and os.listdir(folder):
    raise ValueError(f"prepared data at {folder} is incomplete or corrupt (dataset_info.json is "
                     "missing); delete that directory to regenerate it")
