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
    env_values = {key: env[var] for key, var in (("ept", "MMU_EPT"), ("tdp_mmu", "MMU_TDP_MMU"),
                                                 ("backend", "MMU_BACKEND")) if var in env}
    _check_agree(env_values, "the environment (MMU_BACKEND, MMU_TDP_MMU)")
    for key, raw in env_values.items():
        var = {"ept": "MMU_EPT", "tdp_mmu": "MMU_TDP_MMU", "backend": "MMU_BACKEND"}[key]
        _apply(key, raw, values, sources, f"environment {var}")
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
    else:
        raise InvalidConfig(key, f"unknown parameter (known: ept, backend, tdp_mmu) in {source}")


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
