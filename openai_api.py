"""OpenAI-compatible API server for Qwen (v1) chat models (QWEN_SPEC §7); the logic is in `qwen/api/`.

    python openai_api.py -c CHECKPOINT_DIR [--server-name 127.0.0.1] [--server-port 8000]
                         [--api-auth USER:PASSWORD] [--api-key KEY] [--cpu-only] [--disable-gc]

Then, with the official client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "你好"}])

`--help` lists every option and endpoint.
"""

import sys

from qwen.api.server import main

if __name__ == "__main__":
    sys.exit(main())
