"""Module parameters, like kvm.ko's and kvm_intel.ko's: `ept`, `backend` (alias `tdp_mmu`).

Values come, lowest precedence first, from the defaults, a TOML config file (`--config`, or
the file named by MMU_CONFIG), and environment variables (MMU_EPT, MMU_BACKEND, MMU_TDP_MMU).
A VM snapshots them when it is created (see config.VMConfig.params); changing them later
changes only VMs created later, as KVM's tdp_mmu parameter does.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mmu_core.errors import InvalidConfig

_TRUE = {"1", "y", "yes", "on", "true", "Y"}
_FALSE = {"0", "n", "no", "off", "false", "N"}


class Params(BaseModel):
    """The parameters a VM snapshots at creation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ept: bool = Field(True, description="use two-dimensional paging (EPT); off = shadow paging")
    backend: str = Field(
        "tdp",
        description="backend for direct (TDP) roles; 'shadow' is KVM's legacy MMU (tdp_mmu=N)",
    )
    # KVM's module parameters that change how the TDP MMU works; each one is read where KVM
    # reads it (the plugin or the hardware model), and `mmu params` shows where it came from.
    ept_ad: bool = Field(True, description="kvm_intel.ept_ad: EPT accessed/dirty bits; off = "
                         "access tracking by clearing RWX and dirty logging by write-protection")
    pml: bool = Field(True, description="kvm_intel.enable_pml: page-modification logging for "
                      "dirty logging (D bits cleared instead of write-protection); needs ept_ad "
                      "and is off without it, as KVM's hardware_setup turns it off")
    eager_page_split: bool = Field(True, description="kvm.eager_page_split: split huge pages "
                                   "when dirty logging is enabled or cleared, not on the first "
                                   "write")
    nx_huge_pages: bool = Field(False, description="kvm.nx_huge_pages: iTLB multihit "
                                "mitigation: executable pages are mapped 4K only; huge pages "
                                "split for it are recovered by a background worker")
    nx_huge_pages_recovery_ratio: int = Field(60, ge=0, description="kvm.nx_huge_pages_recovery"
                                              "_ratio: each recovery run zaps 1/ratio of the "
                                              "split pages (0 = no recovery)")
    nx_huge_pages_recovery_period_ms: int = Field(0, ge=0, description="kvm.nx_huge_pages_"
                                                  "recovery_period_ms: time between recovery "
                                                  "runs; 0 = 3600 s / ratio, as KVM computes it")
    slot_zap_all: bool = Field(True, description="KVM_X86_QUIRK_SLOT_ZAP_ALL, a per-VM quirk "
                               "(on unless the VMM disables it with KVM_CAP_DISABLE_QUIRKS2): "
                               "deleting or moving a memslot zaps every mapping "
                               "(kvm_mmu_zap_all_fast); off = only the slot's "
                               "(kvm_mmu_zap_memslot)")

    tdp_mmu_revert: str = Field("", description="not KVM's: comma-separated changes to the TDP "
                                "MMU to undo, to measure what each bought (fast-pf, "
                                "atomic-clear-d, split-on-fault, recover-in-place; docs/tdp.md)")

    @property
    def pml_enabled(self) -> bool:
        """PML as KVM ends up with it: vmx.c hardware_setup clears enable_pml without A/D."""
        return self.pml and self.ept_ad


class ParamSource(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    value: str
    source: str  # "default", "config file <path>", "environment MMU_..."
    description: str


def _parse_bool(field: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip()
    if text in _TRUE or text.lower() in _TRUE:
        return True
    if text in _FALSE or text.lower() in _FALSE:
        return False
    raise InvalidConfig(field, f"{raw!r} is not a boolean (use 1/0, y/n, on/off, true/false)")


def load_params(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> tuple[Params, list[ParamSource]]:
    """Resolve the parameters and say where each value came from."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    sources: dict[str, str] = {name: "default" for name in Params.model_fields}
    path = config_file or env.get("MMU_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidConfig("config", f"file {path} does not exist") from None
        except IsADirectoryError:
            raise InvalidConfig("config", f"{path} is a directory, not a TOML file") from None
        except UnicodeDecodeError:
            raise InvalidConfig("config", f"{path} is not UTF-8 text") from None
        except OSError as exc:
            raise InvalidConfig("config", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidConfig("config", f"{path} is not valid TOML: {exc}") from None
        table = data.get("params", data)
        if not isinstance(table, dict):
            raise InvalidConfig("config", f"{path}: [params] must be a table of parameters, "
                                f"not {type(table).__name__}")
        _check_agree(table, f"config file {path}")
        for key, raw in table.items():
            _apply(key, raw, values, sources, f"config file {path}")
    env_names = {name: f"MMU_{name.upper()}" for name in (*Params.model_fields, "tdp_mmu")}
    env_values = {key: env[var] for key, var in env_names.items() if var in env}
    _check_agree(env_values, "the environment (MMU_BACKEND, MMU_TDP_MMU)")
    for key, raw in env_values.items():
        _apply(key, raw, values, sources, f"environment {env_names[key]}")
    for key, raw in (overrides or {}).items():
        if raw is not None:
            _apply(key, raw, values, sources, "command line")
    params = Params(**values)
    described = [
        ParamSource(
            name=name,
            value=str(getattr(params, name)).lower()
            if isinstance(getattr(params, name), bool)
            else str(getattr(params, name)),
            source=sources[name],
            description=field.description or "",
        )
        for name, field in Params.model_fields.items()
    ]
    return params, described


def report_params(params: Params) -> dict[str, str]:
    """The parameters as reports print them (booleans as true/false, as `mmu params` does)."""
    return {name: str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in params.model_dump().items()}


def _check_agree(given: Mapping[str, object], source: str) -> None:
    """`backend` and KVM's `tdp_mmu` name the same choice: one source may not say both ways.
    (Between sources the later wins, command line > environment > file, and `mmu params`
    shows which one did.)"""
    if "backend" in given and "tdp_mmu" in given:
        implied = "tdp" if _parse_bool("tdp_mmu", given["tdp_mmu"]) else "shadow"
        if str(given["backend"]).strip() != implied:
            raise InvalidConfig("backend", f"{source} sets backend={given['backend']!r} but "
                                f"tdp_mmu={given['tdp_mmu']!r} (which means {implied!r})")


def _apply(key: str, raw: object, values: dict, sources: dict, source: str) -> None:
    if key == "tdp_mmu":
        # KVM's boolean: Y selects the TDP MMU, N the legacy (shadow-plugin) MMU for TDP roles.
        values["backend"] = "tdp" if _parse_bool("tdp_mmu", raw) else "shadow"
        sources["backend"] = f"{source} (tdp_mmu)"
    elif key == "ept":
        values["ept"] = _parse_bool("ept", raw)
        sources["ept"] = source
    elif key == "backend":
        name = str(raw).strip()
        if not name:
            raise InvalidConfig("backend", "empty backend name")
        values["backend"] = name
        sources["backend"] = source
    elif key in Params.model_fields:
        if Params.model_fields[key].annotation is bool:
            values[key] = _parse_bool(key, raw)
        elif Params.model_fields[key].annotation is str:
            values[key] = str(raw).strip()
        else:
            try:
                value = int(str(raw).strip(), 0)
            except ValueError:
                raise InvalidConfig(key, f"{raw!r} is not an integer") from None
            if value < 0:
                raise InvalidConfig(key, f"must be at least 0, got {value}")
            values[key] = value
        sources[key] = source
    else:
        known = ", ".join((*Params.model_fields, "tdp_mmu"))
        raise InvalidConfig(key, f"unknown parameter (known: {known}) in {source}")


#: The three configurations of ARCHITECTURE.md, by the names the CLI and reports use.
CONFIGURATIONS: dict[str, Params] = {
    "tdp": Params(ept=True, backend="tdp"),
    "legacy": Params(ept=True, backend="shadow"),
    "shadow": Params(ept=False, backend="tdp"),
}


def configuration(name: str) -> Params:
    """Parameters of a configuration by name: tdp, legacy, shadow, or the name of any installed
    backend (its direct roles on EPT). Whether that backend is installed is checked when a VM
    is created (PluginError)."""
    if name in CONFIGURATIONS:
        return CONFIGURATIONS[name]
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise InvalidConfig("configuration", f"bad configuration name {name!r}")
    return Params(ept=True, backend=name)


def configuration_name(params: Params) -> str:
    if not params.ept:
        return "shadow"
    return {"tdp": "tdp", "shadow": "legacy"}.get(params.backend, params.backend)
