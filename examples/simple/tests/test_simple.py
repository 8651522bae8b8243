"""Your own tests go here; the conformance suite runs beside them (see pyproject's addopts)."""

from mmu_core import discover


def test_simple_is_discovered():
    assert discover()["simple"].info.name == "simple"
