import pytest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A data_dir shared by the tests of one module (tiny datasets are prepared once)."""
  return str(tmp_path_factory.mktemp("eval_data"))
