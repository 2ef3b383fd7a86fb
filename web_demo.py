"""Chat with a Qwen (v1) chat model in the browser (Gradio).

    python web_demo.py -c Qwen/Qwen-7B-Chat [--cpu-only] [--server-port 8000] [--share]
    python web_demo.py -c Qwen/Qwen-7B-Chat --upstream http://gpu-host:8001   # generate elsewhere

Everything lives in qwen/web.py; `python web_demo.py --help` lists the options.
"""

import sys

from qwen.web import main

if __name__ == "__main__":
    sys.exit(main())
