"""The generation-based fast zap (plugins/shadow/mmu_shadow/fastzap.py, KVM's
kvm_mmu_zap_all_fast): zap-all makes every shadow page obsolete at once (out of the hash,
every vCPU reloads), zaps the obsolete pages oldest first and frees them in one commit; the
guest then runs on pages of the new generation."""

import pytest
from shadow_util import clean, machine, race_a_reader, shadow, touch

from mmu_core.vm.vcpu import REQ_MMU_RELOAD


@pytest.mark.parametrize("config", ["legacy", "shadow"])
def test_zap_all_obsoletes_every_page_and_the_guest_runs_on_new_ones(request, config):
    m = machine(request, config)
    touch(m, range(16))
    sh = shadow(m)
    old = list(sh.by_pfn.values())
    assert old and all(sp.mmu_valid_gen == 0 for sp in old)
    m.vm.zap_all()
    assert sh.mmu_valid_gen == 1 and sh.stats["fast_zaps"] == 1
    assert not sh.pages  # nothing valid is left in the hash
    assert all(v.requests & REQ_MMU_RELOAD for v in m.vm.vcpus)
    # Only the roots the vCPU still holds are left, invalid, until it reloads.
    assert all(sp.role.invalid and sp.root_count for sp in sh.by_pfn.values())
    assert touch(m, range(16), write=False)[:, 0].tolist() == [p + 1 for p in range(16)]
    live = list(sh.by_pfn.values())
    assert not any(sp is o for sp in live for o in old)  # all freed, the roots on reload
    assert all(sp.mmu_valid_gen == 1 for sp in sh.by_pfn.values())
    assert all(sp.mmu_valid_gen == 1 for sp in sh.pages.values())
    clean(m)


def test_an_obsolete_previous_root_is_not_reused(request):
    m = machine(request, "shadow")
    touch(m, [0])
    sh = shadow(m)
    st = sh.vroots[0]
    root = st.root
    m.vm.zap_all()
    touch(m, [1], write=False)
    assert st.root is not root and st.root.mmu_valid_gen == 1
    assert all(sp is not root for sp in sh.by_pfn.values())  # dropped on reload and freed
    clean(m)


def test_zapping_obsolete_pages_yields_the_lock_to_a_waiter(request):
    # kvm_zap_obsolete_pages: every BATCH_ZAP_PAGES pages it yields the lock if someone
    # waits for it (fast_zap_yields counts it)
    from mmu_shadow.fastzap import BATCH_ZAP_PAGES

    m = machine(request, "legacy", pages=16 * 512)
    touch(m, [512 * r for r in range(16)])  # one level-1 shadow page per 2 MiB
    sh, vm = shadow(m), m.vm
    assert len(sh.by_pfn) > 2 * BATCH_ZAP_PAGES
    times = race_a_reader(vm, vm.zap_all)
    assert times["reader_got_lock"] < times["work_end"]
    assert sh.stats["fast_zap_yields"] >= 1 and sh.stats["fast_zaps"] == 1
    clean(m)
