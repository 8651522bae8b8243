"""The per-fault hooks (and the per-page aging one) are resolved once per VM: the backend's
bound methods when it alone implements them, pluggy's call (same semantics) in every other
case."""

from __future__ import annotations

import pytest

from mmu_core import VMConfig, create_vm, plugins
from mmu_core.backend import hookimpl
from mmu_core.params import configuration
from mmu_core.plugins import dispatcher


@pytest.mark.parametrize("name", ["tdp", "legacy", "shadow"])
def test_a_vm_calls_its_backends_fault_hooks_directly(name):
    vm = create_vm(VMConfig(params=configuration(name)))
    try:
        backend = vm.backend_instances[vm.backend_name]
        assert vm.page_fault == backend.mmu_page_fault  # the bound method, no pluggy call
        assert vm.page_fault.__self__ is backend
        # Both backends have the fast page fault (the shadow backend's answers None under
        # shadow paging, as KVM's FNAME(page_fault) never tries it), and both age SPTEs:
        # the host's page aging calls it per page.
        assert vm.fast_page_fault == backend.mmu_fast_page_fault
        assert vm._age_gfn_range == backend.mmu_age_gfn_range
    finally:
        vm.destroy()


class One:
    def __init__(self, result):
        self.result, self.calls = result, []

    @hookimpl
    def mmu_page_fault(self, vcpu, fault):
        self.calls.append((vcpu, fault))
        return self.result


class Subset:
    @hookimpl
    def mmu_page_fault(self, fault):  # pluggy passes only what an implementation names
        return ("subset", fault)


class Wrapper:
    def __init__(self):
        self.seen = []

    @hookimpl(wrapper=True)
    def mmu_page_fault(self, vcpu, fault):
        result = yield
        self.seen.append(result)
        return result


def manager(*plugins_):
    pm = plugins._new_pm()
    for i, p in enumerate(plugins_):
        pm.register(p, name=f"p{i}")
    return pm.hook.mmu_page_fault


def test_one_plain_implementation_is_its_bound_method_and_returns_as_pluggy_does():
    for result in (1, None):
        impl = One(result)
        hook = manager(impl)
        call = dispatcher(hook, "vcpu", "fault")
        assert call == impl.mmu_page_fault
        assert call("v", "f") == hook(vcpu="v", fault="f") == result
        assert impl.calls == [("v", "f"), ("v", "f")]


def test_nothing_implemented_is_none():
    assert dispatcher(manager(), "vcpu", "fault") is None


def test_every_other_case_calls_through_pluggy_with_its_semantics():
    # Two implementations: firstresult, the last registered first, None skipped.
    first, second = One(None), One(2)
    hook = manager(second, first)
    call = dispatcher(hook, "vcpu", "fault")
    assert not hasattr(call, "__self__")
    assert call("v", "f") == 2 and first.calls and second.calls
    # A wrapper around the implementation still wraps it.
    wrap, impl = Wrapper(), One(3)
    call = dispatcher(manager(impl, wrap), "vcpu", "fault")
    assert call("v", "f") == 3 and wrap.seen == [3]
    # An implementation taking a subset of the arguments gets only those.
    assert dispatcher(manager(Subset()), "vcpu", "fault")("v", "f") == ("subset", "f")
