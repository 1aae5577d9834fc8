"""The criterion table: every criterion is listed, and a broken criterion module fails loudly."""
import sys

import pytest

import pruners
from pruners import registry

ALL = {"Weight", "Taylor", "Random", "OBA", "fastOBA", "C-OBD", "C-OBS", "Kron-OBD", "Kron-OBS",
       "Eigen", "Slim"}


def test_registry_lists_every_criterion():
    assert set(registry.available_methods()) == ALL
    for name in ALL:
        assert registry.get_method(name).name == name


def test_a_criterion_module_that_cannot_be_imported_is_an_error(monkeypatch):
    registry.available_methods()
    monkeypatch.delattr(pruners, "slimming")
    monkeypatch.setitem(sys.modules, "pruners.slimming", None)  # import now fails
    with pytest.raises(ImportError, match="slimming"):
        registry.available_methods()
