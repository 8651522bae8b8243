"""The kit for backend authors: the template is the example, the suite passes conforming
backends (the example and the in-tree ones, through the installed pytest plugin), and it
fails broken ones, naming the contract each breaks."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmu_core import register_backend, unregister_backend
from mmu_core.template import files
from mmu_core.testing.explore import run_schedule
from mmu_core.testing.pytest_plugin import SUITE

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "simple"


def test_the_example_is_exactly_what_the_template_writes():
    want = files("simple")
    have = {str(p.relative_to(EXAMPLE)): p.read_text() for p in EXAMPLE.rglob("*")
            if p.is_file() and not any(part.startswith(".") or part == "__pycache__"
                                       or part.endswith(".egg-info")
                                       for part in p.relative_to(EXAMPLE).parts)}
    assert have == want, "examples/simple drifted from mmu_core/templates/backend: " \
        "regenerate it with `mmu new-backend simple --dir examples/simple`"


def test_the_suite_passes_the_example_and_the_in_tree_configurations():
    # The pytest plugin is installed with the project (entry point pytest11); the example
    # backend is installed by .ci/run, as an author would install theirs.
    cmd = [sys.executable, "-m", "pytest", "-c", os.devnull, "--rootdir", str(SUITE.parent),
           str(SUITE), "-q", "-p", "no:cacheprovider", "--mmu-schedules", "2",
           "--mmu-examples", "3", "--mmu-backend", "simple", "--mmu-backend", "legacy",
           "--mmu-backend", "shadow"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "MMU backend conformance" in proc.stdout
    for name in ("simple", "legacy", "shadow"):
        assert f"{name:<10} concurrency   pass" in proc.stdout


def _variant(name: str, old: str, new: str):
    """The template's backend with one line changed, registered in-process as `name`."""
    src = files(name)[f"{name}_mmu/__init__.py"]
    assert old in src, f"the template no longer contains {old!r}"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"mmu_variant_{name}_{os.getpid()}.py"
    path.write_text(src.replace(old, new))
    spec = importlib.util.spec_from_file_location(f"mmu_variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Backend


# (contract broken, the line changed, scenario that shows it, invariants that may name it)
BROKEN = [
    ("readonly", "writable = res.writable and not slot.readonly and",
     "writable = res.writable and", "readonly",
     {"readonly-writable", "mmu-writable", "reference"}),
    ("noflush", "                    flush |= self._zap(root, root_level, 0, start, end)\n"
     "        return flush", "                    flush |= self._zap(root, root_level, 0, "
     "start, end)\n        return False", "host-events", {"tlb-freed"}),
    ("noretry", "if vm.mmu_invalidate_retry_gfn(seq, as_id, gfn):", "if False:",
     "host-events", {"spte-pfn", "leaf-freed", "reference", "tlb-freed"}),
    ("nodirty", "vm.mark_page_dirty(as_id, gfn)  # before the guest can write through it",
     "pass", "dirty-log", {"dirty-log", "dirty-lost"}),
    ("leak", "            for pfn in doomed:\n                vm.free_pt_page(pfn)\n",
     "", "zap-all", {"table-leak", "teardown-leak"}),
]


@pytest.mark.parametrize(("bug", "old", "new", "scenario", "names"), BROKEN,
                         ids=[b[0] for b in BROKEN])
def test_the_suite_names_the_contract_a_broken_backend_breaks(bug, old, new, scenario, names):
    name = f"broken_{bug}"
    register_backend(_variant(name, old, new))
    try:
        failed = None
        for seed in range(30):
            for policy in ("random", "pct"):
                o = run_schedule(scenario, name, policy, seed)
                if not o.ok:
                    failed = o
                    break
            if failed:
                break
        assert failed is not None, f"the {bug} backend passed 60 schedules of {scenario}"
        assert failed.invariant in names, f"{failed.invariant}: {failed.detail}"
        assert "\n" not in f"{failed.invariant}: {failed.detail}"  # one line
        fine = run_schedule(scenario, "simple", failed.policy, failed.seed)
        assert fine.ok, f"the unbroken template fails the same schedule: {fine.detail}"
    finally:
        unregister_backend(name)
