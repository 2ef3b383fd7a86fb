"""Locate the Qwen v1 vocabulary file (``qwen.tiktoken``).

The vocabulary is not shipped in this repository: the ``dashscope`` package on
PyPI carries an identical copy under ``dashscope/resources/``, so we find it
there unless the caller names a file explicitly.
"""

import importlib.util
import os

VOCAB_FILENAME = "qwen.tiktoken"


def find_qwen_tiktoken(path=None):
    """Return the path of ``qwen.tiktoken``.

    ``path``, when given, must exist. Otherwise the copy inside the installed
    ``dashscope`` package is used. ``find_spec`` only locates the package, so
    dashscope's (heavy) top-level module is never imported.
    """
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Qwen vocabulary file not found: {path!r}")
        return path

    try:
        spec = importlib.util.find_spec("dashscope")
    except (ImportError, ValueError):
        spec = None
    for package_dir in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(package_dir, "resources", VOCAB_FILENAME)
        if os.path.isfile(candidate):
            return candidate

    raise FileNotFoundError(
        f"Could not find the Qwen vocabulary file {VOCAB_FILENAME!r}: it ships inside the "
        "'dashscope' package, so run `pip install dashscope`, or pass the file explicitly "
        "(e.g. `--vocab PATH`)."
    )
