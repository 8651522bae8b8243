"""Real memory traces (valgrind lackey) as guest programs: parsed exactly, the same guest view
in every configuration, bad lines named by their number."""

import gzip
from pathlib import Path

import numpy as np
import pytest

import cli
from mmu_core.errors import InvalidConfig
from mmu_core.hw import cpu as C
from mmu_core.params import CONFIGURATIONS, configuration
from mmu_core.workloads.trace import TraceOptions, parse_lackey, run_trace

SHIPPED = Path(__file__).resolve().parent.parent / "traces" / "true.lackey.gz"


def test_lackey_lines_become_fetches_loads_and_stores(tmp_path):
    path = tmp_path / "t.lackey"
    path.write_text("==1== Lackey\nI  0401ab70,3\n L 1fff000778,8\n S 1fff000770,8\n"
                    " M 0402b000,4\n")
    ops, addrs, lines = parse_lackey(path)
    assert ops.tolist() == [C.OP_FETCH, C.OP_READ, C.OP_WRITE, C.OP_READ, C.OP_WRITE]
    assert addrs.tolist() == [0x401AB70, 0x1FFF000778, 0x1FFF000770, 0x402B000, 0x402B000]
    assert lines.tolist() == [2, 3, 4, 5, 5]
    gz = tmp_path / "t.lackey.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert np.array_equal(parse_lackey(gz)[1], addrs)


def test_a_shipped_trace_of_a_real_program_looks_the_same_to_every_configuration():
    opts = TraceOptions(vcpus=2, limit=40_000)
    reports = [run_trace(SHIPPED, opts, configuration(c)) for c in CONFIGURATIONS]
    assert len({r.digest for r in reports}) == 1
    assert reports[0].pages > 20 and reports[0].accesses == 40_000


@pytest.mark.parametrize(("text", "says"), [
    ("I  0401ab70,3\nX bad\n", ":2: not a lackey line"),
    ("I  zz,3\n", ":1: not a lackey line"),
    ("==1== nothing\n", "holds no accesses"),
])
def test_a_bad_trace_is_one_line_with_its_line_number(tmp_path, capsys, text, says):
    path = tmp_path / "bad.lackey"
    path.write_text(text)
    with pytest.raises(InvalidConfig, match=says):
        parse_lackey(path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "trace", str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and says in lines[0]
