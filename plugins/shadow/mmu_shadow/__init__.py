"""mmu-backend-shadow: KVM's shadow MMU as a backend of mmu_core (entry point `shadow`)."""

from mmu_shadow.shadow_mmu import ShadowMMU

plugin = ShadowMMU

__all__ = ["ShadowMMU", "plugin"]
