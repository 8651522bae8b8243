"""Architecture facts, one subpackage per architecture (only x86 today)."""
