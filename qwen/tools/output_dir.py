"""How the tools write a checkpoint directory OUT (tiny_checkpoint, export_qwen2).

- OUT may not be a source checkpoint nor contain one (symlinks resolved); OUT inside SRC is fine.
- A non-empty OUT is refused unless `force`. With `force` the new checkpoint replaces the old one:
  files of the same name are replaced, the weight files the new checkpoint does not have
  (`model*.safetensors`, `pytorch_model*.bin` and their index files) are deleted, and every other
  file (a README, notes, ...) is left alone.
- Everything is written to a staging folder next to OUT (same filesystem) and renamed into place,
  so a failure leaves OUT as it was, and a symlink in OUT (e.g. into a Hugging Face cache) is
  replaced by a regular file, its target untouched.
- Remote code that is not ours (the 2023 `*.py`) is kept as `<name>.orig` (see write_remote_code).
"""

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path

from ..modeling_qwen import REMOTE_CODE_FILES, write_remote_code

WEIGHT_FILES = ("model*.safetensors", "model*.safetensors.index.json",
                "pytorch_model*.bin", "pytorch_model*.bin.index.json")


def check_output(out, force: bool = False, sources: Iterable = ()) -> Path:
    """OUT, resolved, once it is safe to write a checkpoint there; raises ValueError or FileExistsError."""
    target = Path(out).resolve()
    for src in sources:
        source = Path(src).resolve()
        if target == source or target in source.parents:
            raise ValueError(f"the output directory {out} is the source {src} or contains it: choose another")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty: pass --force (force=True) to replace the checkpoint in it")
    return target


@contextmanager
def staged_output(out, force: bool = False, sources: Iterable = ()) -> Iterator[Path]:
    """Check OUT, yield an empty staging folder next to it; when the block succeeds, install what it
    wrote into OUT. The staging folder is always removed."""
    target = check_output(out, force, sources)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install(staging: Path, target: Path) -> list[str]:
    """Move the checkpoint files in `staging` into `target` and delete the stale weight files there.
    Returns the names of the backups of remote code that was not ours."""
    target.mkdir(exist_ok=True)
    written = {path.name for path in staging.iterdir()}
    code = sorted(written & set(REMOTE_CODE_FILES))
    for name in written.difference(code):
        os.replace(staging / name, target / name)  # replaces a symlink, never writes through it
    kept = write_remote_code(target, code)
    for path in target.iterdir():
        if path.name not in written and any(fnmatchcase(path.name, pattern) for pattern in WEIGHT_FILES):
            path.unlink()
    return kept
