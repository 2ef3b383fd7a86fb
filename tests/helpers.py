"""Small helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

import json
import socket


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def edit_json(path, **changes):
    """Update the top-level keys of a JSON file in place."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")
