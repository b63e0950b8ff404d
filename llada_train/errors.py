"""User errors at the entry points: one clean message, no traceback, a non-zero exit.

Contract:
- Bad user input raises `ValueError` (or a subclass) with a message naming the file / line /
  key and what to change (STYLE). `@user_errors` wraps a Hydra task function: such an error
  prints `error: <message>` on stderr and exits with status 2; any other exception is a bug and
  keeps its traceback. `HYDRA_FULL_ERROR=1` re-raises the ValueError too (the full trace).
- `check_known_keys(cfg)` rejects keys that Hydra's `+key=value` added to a typed node (Hydra
  adds them even in struct mode, so `+optim.lrr=1` would otherwise be accepted and ignored).
- `check_writable(path, what)` proves at launch that a directory can be written (a real file
  is created and removed: permission bits say nothing for root or on read-only mounts).
- `disk_full_message(e, path)` turns a write that failed for lack of room (ENOSPC, EDQUOT, EFBIG;
  also behind torch.save's own messages, then found by a probe write) into a message naming
  the path and the free space, or None for other errors.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

EXIT_USER_ERROR = 2
# What to pass for a mandatory config value (`???` in a schema) that is missing at launch.
MISSING_HINTS = {
    "init_from": "the SFT run or HF-format checkpoint to start from, e.g. init_from=runs/sft",
    "model": "a model config, e.g. model=tiny, or init_from=DIR of an HF-format checkpoint",
    "model_dir": "an HF-format LLaDA2.x directory or run dir, e.g. model_dir=runs/sft",
    "out": "the output directory, e.g. out=runs/init",
}
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings as one `warning: ...` line; other libraries' keep their usual form."""
    if os.path.abspath(filename).startswith(_PACKAGE_DIR):
        return f"warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_default_format = warnings.formatwarning


def missing_value_message(cfg: Any) -> str | None:
    """The one-line message for the first mandatory value (`???`) left unset in `cfg`, naming
    the key and what to pass; None when every mandatory value is set. A dry run sized by
    `plan.model` (RL: `rl.loop.dry_run`) reads no weights, so it needs no `init_from`."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if OmegaConf.select(cfg, "dry_run", default=False) and OmegaConf.select(
        cfg, "plan.model", default=None, throw_on_missing=False
    ):
        missing = [key for key in missing if key != "init_from"]
    if not missing:
        return None
    key = missing[0]
    hint = MISSING_HINTS.get(key.split(".")[-1], f"pass {key}=VALUE on the command line")
    more = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
    return f"missing mandatory config value '{key}': {hint}{more}"


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Hydra task function: ValueError -> `error: ...` on stderr, exit status 2;
    a mandatory value left unset (`???`, e.g. RL's init_from) is checked before the task runs
    and reported the same way; warnings raised by this package print as one `warning: ...`
    line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.formatwarning = _format_warning
        try:
            cfg = args[0] if args else None
            message = missing_value_message(cfg) if cfg is not None else None
            if message is not None:
                raise ValueError(message)
            return fn(*args, **kwargs)
        except ValueError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def check_known_keys(cfg: Any, prefix: str = "") -> None:
    """ValueError naming the first key of `cfg` that its typed schema node does not have.
    Nodes typed `Any` or `dict` (model, sampler, deepspeed.overrides, ...) are left to their
    own validation."""
    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    fields = {f.name for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(
                f"unknown config key '{name}' (added with '+'?); valid keys"
                f"{' of ' + prefix.rstrip('.') if prefix else ''}: {sorted(fields)}"
            )
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            check_known_keys(child, name + ".")


def check_writable(path: str, what: str) -> None:
    """Create `path` if needed and write a file into it, else a ValueError naming `what`."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(
            f"{what} {path} is not writable ({e.strerror or e}); fix its permissions or choose "
            "another output_dir"
        ) from None


def _probe_write(path: str, num_bytes: int = 2**20) -> OSError | None:
    """Write `num_bytes` next to `path`; the disk error it meets (ENOSPC, EDQUOT, EFBIG) or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0" * num_bytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e if e.errno in _DISK_ERRNOS else None
    return None


def disk_full_message(e: BaseException, path: str) -> str | None:
    """A clear message when `e` is a write that ran out of disk or file-size room, else None.
    torch.save reports such a failure in several words ('file write failed', 'iostream error',
    'unexpected pos'), so anything but an OSError with a disk errno is judged by writing 1 MiB
    next to `path` (call this before freeing what the failed write used)."""
    if not (isinstance(e, OSError) and e.errno in _DISK_ERRNOS) and _probe_write(path) is None:
        return None
    try:
        free = f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return (
        f"could not write {path}: no space left on device or file too large ({free}; "
        f"{type(e).__name__}: {e}). Free space or set output_dir on a larger disk"
    )
