"""Resolving `--model`: a checkpoint folder, or a preset name made once and cached."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import DsvError
from .presets import PRESET_NAMES


def cache_root() -> Path:
    """Where preset checkpoints are cached: $DSV4_HOME, else $XDG_CACHE_HOME/dsv4."""
    if os.environ.get("DSV4_HOME"):
        return Path(os.environ["DSV4_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "dsv4"


def resolve_model(spec: str, progress: bool = True) -> Path:
    """An existing folder wins; otherwise a preset name is made (first use) and cached."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec in PRESET_NAMES:
        if spec in ("flash", "pro"):
            raise DsvError(f"preset '{spec}' has full size; make a reduced copy with "
                           f"`dsv4 make-model DIR --preset {spec} --layers N --experts N`")
        target = cache_root() / "models" / spec
        if not (target / "config.json").is_file():
            from .random_checkpoint import make_random_checkpoint  # noqa: PLC0415
            print(f"dsv4: creating the random-weight '{spec}' checkpoint in {target} "
                  "(first use)", file=sys.stderr)
            make_random_checkpoint(target, spec, progress=progress)
        return target
    if path.exists():
        raise DsvError(f"--model {spec}: not a folder")
    raise DsvError(f"--model {spec}: no such folder, and not a preset "
                   f"({', '.join(p for p in PRESET_NAMES if p not in ('flash', 'pro'))})")
