"""Replace the 2023 remote code inside an original Qwen checkpoint directory with ours.

    python -m qwen.tools.upgrade_remote_code CHECKPOINT_DIR

The original `modeling_qwen.py` & co. fail on transformers 5, so anything that loads a published
checkpoint with `trust_remote_code=True` (other tools, scripts, servers) breaks. This writes our
implementation files next to the weights instead and adds the `auto_map` entries pointing at them
to config.json and tokenizer_config.json; the weights stay as they are. Each original file we replace
(the 2023 `*.py`, a config we change) is kept once as `<name>.orig`, so nothing is lost. Files are
renamed into place, never written through: a symlink into a Hugging Face cache becomes a regular
file and the shared blob is left untouched. With `import qwen` no upgrade is needed.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from ..modeling_qwen import CONFIG_AUTO_MAP, write_remote_code
from ..tokenization_qwen import AUTO_MAP as TOKENIZER_AUTO_MAP
from . import run_cli_action


def _add_auto_map(path: Path, entries: dict) -> list[str]:
    """Add `entries` to the JSON file's auto_map; returns the name of the backup made, if any."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    auto_map = data.setdefault("auto_map", {})
    if all(auto_map.get(key) == value for key, value in entries.items()):
        return []
    auto_map.update(entries)
    backup, staged = path.with_name(f"{path.name}.orig"), path.with_name(f".{path.name}.partial")
    kept = []
    if not os.path.lexists(backup):
        shutil.copyfile(path, backup)
        kept.append(backup.name)
    staged.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(staged, path)  # replaces a symlink, never writes through it
    return kept


def upgrade(directory) -> list[str]:
    """Upgrade `directory` in place; returns the names of the original files kept as `.orig`."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a checkpoint directory")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type != "qwen":
        raise ValueError(f"{config_path}: model_type is {model_type!r}, not 'qwen' (a Qwen v1 checkpoint)")
    kept = write_remote_code(directory)
    kept += _add_auto_map(config_path, CONFIG_AUTO_MAP)
    kept += _add_auto_map(directory / "tokenizer_config.json", TOKENIZER_AUTO_MAP)
    return kept


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="an original Qwen (v1) checkpoint directory, upgraded in place")
    args = parser.parse_args(argv)

    def action():
        kept = upgrade(args.checkpoint)
        saved = f" (originals kept: {', '.join(kept)})" if kept else ""
        return f"{args.checkpoint}: remote code replaced by qwen's{saved}"

    return run_cli_action(action)


if __name__ == "__main__":
    sys.exit(main())
