"""The conformance suite as a pytest plugin (entry point `pytest11`, installed with the
project): `pytest --mmu-backend NAME` adds mmu_core/testing/conformance.py to whatever the
run collects and holds backend NAME to it; without the option the plugin does nothing.

Options: `--mmu-backend NAME` (repeatable), `--mmu-reference CONFIG` (the configuration the
guest-visible behaviour is compared with, default tdp), `--mmu-schedules N` (schedules per
scenario and policy, default 10), `--mmu-examples N` (hypothesis examples per parity test,
default 25). The run ends with one table, capability by capability.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SUITE = Path(__file__).with_name("conformance.py")
_results: dict[tuple[str, str], dict[str, list]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mmu", "kvm-mmu-model backend conformance")
    group.addoption("--mmu-backend", action="append", default=[], metavar="NAME",
                    help="hold installed MMU backend NAME to the conformance suite")
    group.addoption("--mmu-reference", default="tdp", metavar="CONFIG",
                    help="configuration whose guest-visible behaviour is the reference")
    group.addoption("--mmu-schedules", type=int, default=10, metavar="N",
                    help="explorer schedules per scenario and policy")
    group.addoption("--mmu-examples", type=int, default=25, metavar="N",
                    help="hypothesis examples per parity test")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mmu_capability(name): conformance capability group")
    if config.getoption("--mmu-backend"):
        config.args.append(str(SUITE))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mmu_backend" in metafunc.fixturenames:
        names = metafunc.config.getoption("--mmu-backend")
        metafunc.parametrize("mmu_backend", names, scope="session")


@pytest.fixture(scope="session")
def mmu_reference(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--mmu-reference")


@pytest.fixture(scope="session")
def mmu_schedules(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--mmu-schedules")


@pytest.fixture(scope="session")
def mmu_examples(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--mmu-examples")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    mark = item.get_closest_marker("mmu_capability")
    if mark is None or (report.when != "call" and not report.skipped and not report.failed):
        return
    backend = item.callspec.params.get("mmu_backend", "?") if hasattr(item, "callspec") else "?"
    row = _results.setdefault((backend, mark.args[0]), {"passed": [], "failed": [],
                                                         "skipped": []})
    if report.failed:
        line = str(report.longrepr.reprcrash.message if hasattr(report.longrepr, "reprcrash")
                   else report.longrepr).splitlines()[0]
        row["failed"].append(f"{item.name}: {line}")
    elif report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        row["skipped"].append(f"{item.name}: {reason.removeprefix('Skipped: ')}")
    elif report.when == "call":
        row["passed"].append(item.name)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _results:
        return
    tr = terminalreporter
    tr.section("MMU backend conformance")
    width = max(len(cap) for _b, cap in _results)
    for (backend, cap), row in sorted(_results.items()):
        verdict = "FAIL" if row["failed"] else ("pass" if row["passed"] else "skip")
        tr.write_line(f"{backend:<10} {cap:<{width}}  {verdict:<4}  {len(row['passed'])} passed, "
                      f"{len(row['failed'])} failed, {len(row['skipped'])} skipped")
        for line in row["failed"][:3]:
            tr.write_line(f"{'':<10} {'':<{width}}        {line}")
        for line in row["skipped"][:1]:
            tr.write_line(f"{'':<10} {'':<{width}}        skipped: {line}")
    _results.clear()
