"""GPTQ-quantize a Qwen checkpoint (the original's run_gptq.py): see `python run_gptq.py --help`.

    python run_gptq.py --model_name_or_path MODEL --data_path calib.json --out_path MODEL-Int4 --bits 4
"""

import sys

from qwen.tools.gptq_quantize import main

if __name__ == "__main__":
    sys.exit(main())
