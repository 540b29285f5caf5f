"""Explicit environment files: `KEY=VALUE` lines (e.g. credentials) loaded only when asked for.

A process reads an env file only when it is named (`--env-file`, `$XDC_ENV_FILE`, the Airflow
Variable `xdc_env_file`): a deployed process never picks one up because it sits beside a config.
Values already in the environment win.
"""
from __future__ import annotations

import os
from pathlib import Path

from xdc.errors import ConfigError


def load_env_file(path: str | os.PathLike[str]) -> list[str]:
    """Put the file's variables into this process's environment (not overriding); returns their names."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"env file {p}: {exc.strerror or exc}") from None
    names = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or not key.replace("_", "").isalnum():
            raise ConfigError(f"env file {p}, line {n}: not KEY=VALUE")
        os.environ.setdefault(key, value.strip().strip('"').strip("'"))
        names.append(key)
    return names
