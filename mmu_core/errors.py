"""The library's typed errors: one class per kind of bad input, each with one clear message."""

from __future__ import annotations


class MMUError(Exception):
    """Base class of every error the library raises on purpose."""


class InvalidConfig(MMUError):
    """A configuration value cannot work. `field` names it; the message says why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class PluginError(MMUError):
    """A backend is unknown, broken, or claims a name another backend claims."""


class GuestError(MMUError):
    """A guest program or trace is malformed."""


class OutOfMemory(MMUError):
    """The simulated host ran out of frames (a configured limit, not the real machine's)."""


class BackendError(MMUError):
    """A backend broke the MMU interface's contract (e.g. its fix never takes effect)."""


class UseAfterFree(MMUError):
    """MMU code touched a page-table page after it was freed (a missing RCU grace period or
    flush); raised by the VM's SPTE accessors so that the race explorer can name it."""


class HostStateError(MMUError):
    """The host model's own bookkeeping was violated (a frame freed twice, a page populated
    over a mapped one): a bug in the code that drove it, which the explorer names."""
