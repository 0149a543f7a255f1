"""Fixtures of the data tests: tiny configs prepared into temporary data dirs."""

from __future__ import annotations

import pytest

from effattn.testing.data import TINY_MQAR, data_config


@pytest.fixture(scope="session")
def mqar_cfg(tmp_path_factory):
  """A tiny MQAR config whose data is prepared once for the session."""
  return data_config("mqar", tmp_path_factory.mktemp("mqar_data"), seq_len=32, **TINY_MQAR)
