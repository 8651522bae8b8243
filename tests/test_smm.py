"""System-management mode: SMI and RSM as guest operations, SMRAM in address space 1 with an
alias of RAM (two memslots on one host mapping), the state-save map, and parity of everything
the guest sees across tdp, legacy and shadow paging in every paging mode."""

import pytest
from parity_util import data_gva, run_everywhere, spec_for

from mmu_core import VMConfig
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.errors import GuestError, InvalidConfig
from mmu_core.guest.machine import DATA_GPA, DATA_SLOT, build_machine, smm_memslots
from mmu_core.guest.program import Program
from mmu_core.hw import cpu as C
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.audit import audit
from mmu_core.vm.vcpu import SMBASE, SMRAM_CR0, SMRAM_CR3

SMRAM_PRIVATE = SMBASE + 0x1000  # SMRAM the handler uses for its own data


MODES = [P.MODE_5LEVEL, P.MODE_4LEVEL, P.MODE_PAE, P.MODE_32, P.MODE_NONE]


@pytest.mark.parametrize("mode", MODES, ids=[P.MODE_NAMES[m] for m in MODES])
def test_smm_sees_ram_through_its_alias_and_the_guest_cannot_tell_the_backends_apart(mode):
    def program(m):
        smm_memslots(m.vm)
        prog = (Program().write(data_gva(0), 5).read(data_gva(1))
                .smi()
                .read(DATA_GPA).write(DATA_GPA + 4096, 7).write(SMRAM_PRIVATE, 9)
                .read(SMRAM_PRIVATE).load_pte(SMBASE + SMRAM_CR0).load_pte(SMBASE + SMRAM_CR3)
                .rsm()
                .read(data_gva(1)).read(data_gva(0)).write(data_gva(2), 3).read(data_gva(2)))
        return [prog.build()]

    runs = run_everywhere(spec_for(mode), program)
    assert len({digest for digest, _ in runs.values()}) == 1, {k: d for k, (d, _) in runs.items()}
    res = runs["tdp"][1][0]
    assert res[:, C.RES_VECTOR].tolist() == [0] * len(res)
    values = res[:, C.RES_VALUE].tolist()
    assert values[3] == 5  # SMM reads RAM through address space 1's alias
    assert values[6] == 9
    assert values[10] == 7 and values[11] == 5  # and the guest sees what SMM wrote


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_rsm_restores_the_saved_state_and_an_smi_in_smm_is_latched(name):
    m = build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=CONFIGURATIONS[name]))
    try:
        smm_memslots(m.vm)
        vcpu = m.vm.vcpus[0]
        cr0, cr3 = vcpu.cr0, vcpu.cr3
        prog = (Program().rsm().set_cpl(3).smi().load_pte(SMBASE + SMRAM_CR0)
                .load_pte(SMBASE + SMRAM_CR3).smi().rsm().read(SMRAM_PRIVATE).rsm()
                .read(data_gva(0)).build())
        res = m.run_programs([prog])[0]
        assert res[0, C.RES_VECTOR] == EC.UD_VECTOR  # RSM outside SMM
        assert (res[3, C.RES_VALUE], res[4, C.RES_VALUE]) == (cr0, cr3)
        # the latched SMI entered SMM again at the first RSM: the read still hit SMRAM
        assert res[7, C.RES_VECTOR] == 0
        assert vcpu.exits["smi"] == 2 and vcpu.exits["rsm"] == 2
        assert not vcpu.smm and vcpu.cpl == 3 and (vcpu.cr0, vcpu.cr3) == (cr0, cr3)
        assert res[9, C.RES_VECTOR] == 0
        assert not audit(m.vm)
    finally:
        m.vm.destroy()


def test_the_smm_handler_may_change_the_state_rsm_restores():
    """RSM loads what SMRAM holds, not what the vCPU had: a handler that clears CR0.WP in the
    save map resumes the guest without write protection for supervisor writes."""
    m = build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=CONFIGURATIONS["shadow"]))
    try:
        smm_memslots(m.vm)
        vcpu = m.vm.vcpus[0]
        prog = (Program().smi().store_pte(SMBASE + SMRAM_CR0, vcpu.cr0 & ~P.CR0_WP).rsm()
                .build())
        m.run_programs([prog])
        assert not vcpu.cr0 & P.CR0_WP and vcpu.cr0 & P.CR0_PG
    finally:
        m.vm.destroy()


def test_an_smi_without_smram_is_one_clear_error():
    m = build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=CONFIGURATIONS["tdp"]))
    try:
        with pytest.raises(GuestError, match="SMRAM"):
            m.run_programs([Program().smi().build()])
    finally:
        m.vm.destroy()


def test_an_alias_slot_must_lie_in_a_host_mapping():
    m = build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=CONFIGURATIONS["tdp"]))
    try:
        data = m.vm.memslots[0].by_id(DATA_SLOT)
        with pytest.raises(InvalidConfig, match="runs past"):
            m.vm.add_memslot(DATA_SLOT, DATA_GPA, (data.npages + 1) * 4096, as_id=1,
                             hva=data.userspace_addr)
        with pytest.raises(InvalidConfig, match="address space 2"):
            m.vm.add_memslot(9, 0, 4096, as_id=2)
        assert m.vm.memslots[1].by_id(DATA_SLOT) is None
    finally:
        m.vm.destroy()


def test_rsm_brings_back_pcids_and_their_address_space():
    """CR4.PCIDE and CR3's PCID are saved with the rest and restored at RSM (SMM itself runs
    with CR4 clear): the guest reads the same memory after SMM in every configuration."""
    def program(m):
        smm_memslots(m.vm)
        setup = m.paging
        prog = (Program().write(data_gva(0), 5)
                .mov_cr4(setup.cr4 | P.CR4_PCIDE).mov_cr3(setup.cr3 | 1).read(data_gva(0))
                .smi().read(DATA_GPA).rsm()
                .read(data_gva(0)).write(data_gva(1), 6).read(data_gva(1)))
        return [prog.build()]

    runs = run_everywhere(spec_for(P.MODE_4LEVEL), program)
    assert len({digest for digest, _ in runs.values()}) == 1
    res = runs["shadow"][1][0]
    assert res[:, C.RES_VECTOR].tolist() == [0] * len(res)
    values = res[:, C.RES_VALUE].tolist()
    assert (values[3], values[5], values[7], values[9]) == (5, 5, 5, 6)
