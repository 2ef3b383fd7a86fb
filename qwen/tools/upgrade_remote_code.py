"""Replace the 2023 remote code inside an original Qwen checkpoint directory with ours.

    python -m qwen.tools.upgrade_remote_code CHECKPOINT_DIR

The original `modeling_qwen.py` & co. fail on transformers 5, so anything that loads a published
checkpoint with `trust_remote_code=True` (other tools, scripts, servers) breaks. This writes our
implementation files next to the weights instead; the weights and configs stay as they are, and each
original file is kept once as `<name>.orig` (nothing is lost). With `import qwen` no upgrade is needed.
"""

import argparse
import json
import sys
from pathlib import Path

from ..modeling_qwen import CONFIG_AUTO_MAP, REMOTE_CODE_FILES, write_remote_code
from ..tokenization_qwen import AUTO_MAP as TOKENIZER_AUTO_MAP
from . import run_cli_action

def _add_auto_map(path: Path, entries: dict) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    auto_map = data.setdefault("auto_map", {})
    if all(auto_map.get(key) == value for key, value in entries.items()):
        return
    auto_map.update(entries)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def upgrade(directory) -> list[str]:
    """Upgrade `directory` in place; returns the names of the original files kept as `.orig`."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a checkpoint directory")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type != "qwen":
        raise ValueError(f"{config_path}: model_type is {model_type!r}, not 'qwen' (a Qwen v1 checkpoint)")
    kept = []
    for name in REMOTE_CODE_FILES:
        original, backup = directory / name, directory / f"{name}.orig"
        if original.is_file() and not backup.exists():
            original.rename(backup)
            kept.append(backup.name)
    write_remote_code(directory)
    _add_auto_map(config_path, CONFIG_AUTO_MAP)
    _add_auto_map(directory / "tokenizer_config.json", TOKENIZER_AUTO_MAP)
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
