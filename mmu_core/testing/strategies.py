"""hypothesis strategies for guest programs (needs the `test` extra: hypothesis).

`op_strategy` draws one operation of `mmu_core.testing.programs.build`'s language: data
reads, writes and fetches (including the MMIO page and an unmapped page), leaf and PDE
edits followed by their invalidation, CPL/AC changes, CR0.WP, CR4.SMEP/SMAP, CR3 reloads, and
visits to SMM (SMI, reads and writes of data and SMRAM with paging off, RSM).
"""

from __future__ import annotations

from hypothesis import strategies as st

from mmu_core.testing.programs import DATA_PAGES

op_strategy = st.one_of(
    st.tuples(st.just("read"), st.integers(0, DATA_PAGES + 1)),
    st.tuples(st.just("write"), st.integers(0, DATA_PAGES + 1), st.integers(1, 2**40)),
    st.tuples(st.just("fetch"), st.integers(0, DATA_PAGES + 1)),
    st.tuples(st.just("pte"), st.integers(0, DATA_PAGES - 1), st.integers(0, 31),
              st.booleans(), st.integers(0, DATA_PAGES - 1)),
    st.tuples(st.just("pde"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("cpl"), st.sampled_from([0, 3])),
    st.tuples(st.just("ac"), st.booleans()),
    st.tuples(st.just("wp"), st.booleans()),
    st.tuples(st.just("cr4"), st.booleans(), st.booleans()),
    st.tuples(st.just("cr3")),
    st.tuples(st.just("smm"), st.lists(st.tuples(st.integers(0, DATA_PAGES),
                                                 st.sampled_from([0, 0, 1, 2**40 - 1])),
                                       min_size=1, max_size=4)),
)
