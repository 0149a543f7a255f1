import pytest

from effattn import attention
from effattn.testing.mechanisms import build


def test_names_include_softmax():
  assert "softmax" in attention.names()
  assert attention.names() == sorted(attention.names())


def test_unknown_name_lists_registered():
  with pytest.raises(ValueError, match="registered: .*softmax"):
    build("flashy")


def test_unknown_option_named():
  with pytest.raises(ValueError, match="model.attention.softmax"):
    build("softmax", softmax={"bogus": 1})


def test_heads_must_divide_width():
  with pytest.raises(ValueError, match="num_heads"):
    build("softmax", d_model=30, num_heads=4)


def test_duplicate_registration_rejected():
  class Other:
    pass

  with pytest.raises(ValueError, match="already registered"):
    attention.register("softmax")(Other)


def test_a_mechanism_without_decode_is_refused_where_it_registers():
  from effattn.attention import base, registry
  with pytest.raises(TypeError, match="'no_decode' has no init_cache or decode: define"):
    @registry.register("no_decode")
    class NoDecode(base.Attention):  # noqa: F841
      pass
  assert "no_decode" not in registry.names()
