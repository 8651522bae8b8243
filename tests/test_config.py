"""VM configuration and module parameters: validation at the edge, snapshot at creation."""

import pytest

from mmu_core import InvalidConfig, Params, VMConfig, create_vm, load_params, validate
from mmu_core.errors import PluginError


def test_zero_vcpus_is_rejected_naming_the_field():
    with pytest.raises(InvalidConfig) as exc:
        validate(VMConfig, vcpus=0)
    assert exc.value.field == "vcpus"


def test_unaligned_memslot_is_rejected():
    with pytest.raises(InvalidConfig) as exc:
        validate(VMConfig, memslots=[dict(slot=0, gpa=0, size=3000)])
    assert "aligned" in str(exc.value)


def test_overlapping_memslots_are_rejected():
    slots = [dict(slot=0, gpa=0, size=8192), dict(slot=1, gpa=4096, size=8192)]
    with pytest.raises(InvalidConfig) as exc:
        validate(VMConfig, memslots=slots)
    assert "overlap" in str(exc.value)


def test_memslot_beyond_maxphyaddr_is_rejected():
    with pytest.raises(InvalidConfig) as exc:
        validate(VMConfig, maxphyaddr=36, memslots=[dict(slot=0, gpa=1 << 36, size=4096)])
    assert "MAXPHYADDR" in str(exc.value)


def test_unknown_backend_lists_installed_ones_and_builds_nothing():
    config = VMConfig(params=Params(backend="nosuch"))
    with pytest.raises(PluginError) as exc:
        create_vm(config)
    # other installed backends may be listed too: only the in-tree ones are certain
    assert {"shadow", "tdp"} <= set(str(exc.value).split("installed: ")[1].split(", "))


def test_params_come_from_file_then_environment_with_sources(tmp_path):
    cfg = tmp_path / "mmu.toml"
    cfg.write_text("[params]\nept = false\nbackend = 'shadow'\n")
    params, sources = load_params(cfg, env={"MMU_TDP_MMU": "Y"})
    assert params == Params(ept=False, backend="tdp")
    by_name = {s.name: s.source for s in sources}
    assert by_name["ept"] == f"config file {cfg}"
    assert by_name["backend"] == "environment MMU_TDP_MMU (tdp_mmu)"


def test_bad_boolean_parameter_names_the_parameter():
    with pytest.raises(InvalidConfig) as exc:
        load_params(env={"MMU_EPT": "maybe"})
    assert exc.value.field == "ept"


def test_vm_keeps_the_parameters_it_was_created_with():
    params, _ = load_params(env={"MMU_BACKEND": "tdp"})
    vm = create_vm(VMConfig(params=params))
    later, _ = load_params(env={"MMU_BACKEND": "shadow"})
    vm2 = create_vm(VMConfig(params=later))
    try:
        assert vm.backend_name == "tdp"
        assert vm.params.backend == "tdp"
        assert vm2.backend_name == "shadow"
    finally:
        vm.destroy()
        vm2.destroy()


def test_ept_off_selects_shadow_paging_whatever_the_backend():
    vm = create_vm(VMConfig(params=Params(ept=False, backend="tdp")))
    try:
        assert vm.role.value == "shadow"
        assert vm.backend_name == "shadow"
    finally:
        vm.destroy()
