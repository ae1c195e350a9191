"""Selecting slot in an atropos-style trainer with one setting.

The trainer builds its tool backend with `create_tool_backend(cfg)`, which
switches on `cfg.tool_pool_mode` ("nomad" | "modal"). `install()` teaches
that factory (and every trainer module that imported it by name) the mode
"slot", which builds a `ControllerToolBackend`; every other mode still goes
to the trainer's own factory:

    import slot_client.atropos
    slot_client.atropos.install()
    # and in the env config: tool_pool_mode = "slot"

Settings come from the config when it has them, else from the environment:
`slot_address` / SLOT_CONTROLLER (default: the local controller socket),
`slot_profile` / SLOT_PROFILE, `slot_token` / SLOT_TOKEN,
`slot_acquire_timeout_s` / SLOT_ACQUIRE_TIMEOUT_S (600),
`slot_conventions` / SLOT_CONVENTIONS ("trainer" or "slot"); for a
`tls:HOST:PORT` controller `slot_tls_cert` / SLOT_TLS_CERT, `slot_tls_key` /
SLOT_TLS_KEY, `slot_tls_ca` / SLOT_TLS_CA (default: the controller's
STATE/tls/trainer.pem, trainer.key, ca.pem; `slot_state_dir` /
SLOT_STATE_DIR names STATE).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

from .tool_backend import DEFAULT_ACQUIRE_TIMEOUT_S, DEFAULT_TIMEOUT_S, ControllerToolBackend

MODE = "slot"
FACTORY = "create_tool_backend"
_installed: dict[str, Callable[[Any], Any]] = {}


def _setting(cfg: Any, name: str, env: str) -> Optional[str]:
    v = getattr(cfg, name, None)
    if v is None and isinstance(cfg, dict):
        v = cfg.get(name)
    if v is None:
        v = os.environ.get(env)
    return None if v is None or v == "" else str(v)


def backend_from_config(cfg: Any) -> ControllerToolBackend:
    """A ControllerToolBackend from the trainer's config (or environment)."""
    acquire = _setting(cfg, "slot_acquire_timeout_s", "SLOT_ACQUIRE_TIMEOUT_S")
    return ControllerToolBackend(
        _setting(cfg, "slot_address", "SLOT_CONTROLLER"),
        _setting(cfg, "slot_profile", "SLOT_PROFILE"),
        _setting(cfg, "slot_token", "SLOT_TOKEN"),
        default_timeout_s=DEFAULT_TIMEOUT_S,
        acquire_timeout_s=float(acquire) if acquire else DEFAULT_ACQUIRE_TIMEOUT_S,
        conventions=_setting(cfg, "slot_conventions", "SLOT_CONVENTIONS") or "trainer",
        tls_cert=_setting(cfg, "slot_tls_cert", "SLOT_TLS_CERT"),
        tls_key=_setting(cfg, "slot_tls_key", "SLOT_TLS_KEY"),
        tls_ca=_setting(cfg, "slot_tls_ca", "SLOT_TLS_CA"),
        tls_server_name=_setting(cfg, "slot_tls_server_name", "SLOT_TLS_SERVER_NAME"),
        state_dir=_setting(cfg, "slot_state_dir", "SLOT_STATE_DIR"))


def _mode(cfg: Any) -> Any:
    return cfg.get("tool_pool_mode") if isinstance(cfg, dict) else getattr(cfg, "tool_pool_mode",
                                                                          None)


def create_tool_backend(cfg: Any, fallback: Optional[Callable[[Any], Any]] = None) -> Any:
    """`tool_pool_mode == "slot"`: a ControllerToolBackend; any other mode:
    the trainer's own factory (or ValueError when there is none)."""
    if _mode(cfg) == MODE:
        return backend_from_config(cfg)
    if fallback is None:
        fallback = _installed.get("atropos.backends")
    if fallback is None:
        raise ValueError(f"unknown tool_pool_mode {_mode(cfg)!r} (slot_client knows only "
                         f"{MODE!r}; the trainer's own factory is not installed)")
    return fallback(cfg)


def install(module: str = "atropos.backends") -> None:
    """Make the trainer's `create_tool_backend` accept tool_pool_mode "slot".
    Patches `module` and every loaded module of the same package that
    imported the factory by name; idempotent."""
    mod = __import__(module, fromlist=[FACTORY])
    original = _installed.get(module) or getattr(mod, FACTORY)
    if getattr(original, "_slot_client", False):
        return
    _installed[module] = original

    def patched(cfg: Any, *args: Any, **kw: Any) -> Any:
        if _mode(cfg) == MODE:
            return backend_from_config(cfg)
        return original(cfg, *args, **kw)

    patched._slot_client = True  # type: ignore[attr-defined]
    patched.__doc__ = original.__doc__
    package = module.split(".")[0]
    for name, m in list(sys.modules.items()):
        if m is not None and (name == package or name.startswith(package + ".")) and \
                getattr(m, FACTORY, None) is original:
            setattr(m, FACTORY, patched)


def uninstall(module: str = "atropos.backends") -> None:
    """Undo install() (tests)."""
    original = _installed.pop(module, None)
    if original is None:
        return
    package = module.split(".")[0]
    for name, m in list(sys.modules.items()):
        f = getattr(m, FACTORY, None) if m is not None else None
        if (name == package or name.startswith(package + ".")) and getattr(f, "_slot_client",
                                                                           False):
            setattr(m, FACTORY, original)
