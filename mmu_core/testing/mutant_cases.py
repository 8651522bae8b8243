"""Where each seeded protocol bug (mmu_core.mutants) shows: the scenario, configuration and
schedule policy in which the race explorer catches it, and how many schedules that may take.
tests/test_explore.py holds every mutant to its case; benchmarks/explore.py measures how many
schedules each case needs (the table in docs/concurrency.md)."""

#: (mutant, scenario, configuration, policy[, schedules: default 40]). skip-frozen-wait is
#: absent: nothing in the model can reach it yet (docs/concurrency.md).
MUTANT_CASES = [
    ("nested-zap-skipped", "nested", "tdp", "random"),
    ("nested-ept12-write-ignored", "nested-unsync", "legacy", "random"),
    ("nested-skip-ept12-recheck", "nested-reclaim", "legacy", "random"),
    ("nested-unsync-never-synced", "nested-unsync", "legacy", "random"),
    ("tdp-wrprot-gfn-skipped", "nested-l1-program", "tdp", "random"),
    ("populate-no-recheck", "first-touch-thp", "tdp", "random"),
    ("skip-invalidate-retry", "host-events", "shadow", "random"),
    ("no-flush-after-zap", "host-events", "tdp", "random"),
    ("free-without-rcu", "zap-all", "tdp", "pct"),
    ("plain-write-not-cmpxchg", "first-touch", "tdp", "random"),
    ("drop-root-refcount", "first-touch", "tdp", "random"),
    ("writable-read-fault-logging", "dirty-log", "tdp", "random"),
    ("skip-mark-dirty", "dirty-log", "legacy", "random"),
    ("memslot-update-no-srcu-sync", "memslots", "tdp", "random"),
    ("memslot-zap-after-install", "memslots", "legacy", "random"),
    # since memslot updates wait for SRCU (session 5) the window is wide: seeds 4, 21, 28
    ("mmio-generation-at-install", "memslots", "tdp", "random", 60),
    ("skip-gpte-recheck", "pte-race", "shadow", "random"),
    ("no-write-protect-shadowed", "pte-edit", "shadow", "random"),
    # dirty-log no longer reaches it under legacy: the shadow MMU write-protects a logged
    # slot instead of zapping it, and a fault re-adds the very entry the mutant kept
    ("forget-rmap-removal", "host-events", "legacy", "random"),
    ("shadow-readonly-writable", "readonly", "shadow", "random"),
    ("fast-pf-no-mark-dirty", "dirty-log-wrprot", "tdp", "pct"),
    ("fast-pf-ignores-mmu-writable", "readonly", "tdp", "random"),
    ("clear-dirty-log-no-flush", "dirty-log-pml", "tdp", "random"),
    ("split-plain-store", "nx-recovery", "tdp", "random"),
    ("recover-ignores-host-level", "dirty-log-wrprot", "tdp", "random"),
    ("nx-tracking-kept", "nx-recovery", "tdp", "pct"),
    ("nx-tracking-kept", "nx-recovery", "legacy", "random"),
    ("invlpg-no-sync", "unsync", "shadow", "random"),
    ("sync-roots-skipped", "unsync", "shadow", "pct"),
    ("unsync-no-mark-parents", "unsync", "shadow", "random"),
    ("sync-no-write-protect", "unsync", "shadow", "random"),
    ("reclaim-no-flush", "reclaim", "shadow", "random"),
    ("shadow-split-no-rmap", "shadow-split", "legacy", "random"),
    ("shadow-dirty-log-no-wrprot", "shadow-split", "legacy", "random"),
    # the legacy MMU's fast page fault (fastpf.py): the shared mutants, and the wait
    ("lockless-walk-no-wait", "fast-pf", "legacy", "pct"),
    ("fast-pf-no-mark-dirty", "fast-pf", "legacy", "random"),
    ("fast-pf-ignores-mmu-writable", "readonly", "legacy", "random"),
    ("access-track-not-present", "aging", "legacy", "random"),
    ("recover-keeps-rmap", "shadow-split", "legacy", "random"),
    ("direct-prefetch-logged-slot", "memslots", "legacy", "random"),
    ("fast-zap-no-kick", "fast-pf", "legacy", "pct"),
    ("notifier-skips-smm", "smm", "shadow", "random"),
    ("smm-keeps-root", "smm", "tdp", "random"),
    # PCIDs under shadow paging (mmu_core/testing/explore_pcid.py)
    ("invalidate-pcid-keeps-prev-roots", "pcid", "shadow", "random"),
    ("invpcid-gva-not-reaching-mmu", "pcid", "shadow", "random"),
]
