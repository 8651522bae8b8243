"""mmu-backend-tdp: KVM's TDP MMU as a backend of mmu_core (entry point `tdp`)."""

from mmu_tdp.tdp_mmu import TdpMMU

plugin = TdpMMU

__all__ = ["TdpMMU", "plugin"]
