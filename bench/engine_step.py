"""A decode step through the serving engine against the same step in model.generate().

    python bench/engine_step.py --shape 1_8b --dtype int4
    python bench/engine_step.py --smoke

Every front end (chat, the CLI and web demos, the API server) decodes through qwen.serving's
engine, which runs the model on its own thread. This times, in one process and alternating, the
median time per generated token (greedy, batch 1) of model.generate() on the main thread and of the
engine, each in two configurations:
- released (what the engine does): a thread lets go of its OpenMP worker pool when it hands the
  work on (the engine's thread when it goes idle, the requesting thread at submit), so only the
  computing thread holds one;
- never released: release_openmp_pool switched off, so both threads keep their pools (as before
  the engine released them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import QUANTIZED, SHAPES, _Clock, print_machine, random_model  # noqa: E402  (bench/decode.py)

from qwen import QWenTokenizer  # noqa: E402
from qwen.serving import Engine, SamplingParams  # noqa: E402
import qwen.serving.engine as engine_module  # noqa: E402
from qwen.vocab import find_qwen_tiktoken  # noqa: E402


@torch.inference_mode()
def generate_ms(model, prompt, new_tokens) -> float:
    clock = _Clock()
    model.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock)
    return 1e3 * statistics.median(b - a for a, b in zip(clock.times[2:], clock.times[3:]))


def engine_ms(engine, prompt, new_tokens) -> float:
    gaps = []
    engine.observers[:] = [lambda name, seconds: gaps.append(seconds) if name == "inter_token_latency" else None]
    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False, stop_token_ids=[])
    out = engine.submit(prompt[0].tolist(), params).result()
    assert out.completion_tokens == new_tokens, out.finish_reason
    return 1e3 * statistics.median(gaps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1_8b")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", *QUANTIZED], default="int4")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few seconds (checks the script runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.new_tokens, args.rounds = "tiny", 6, 1
    torch.set_num_threads(args.threads)
    print_machine(0.25 if args.smoke else 1.0)

    model = random_model(SHAPES[args.shape], 151936, 4096, args.dtype, 0)
    engine = Engine(model, QWenTokenizer(find_qwen_tiktoken(None)), max_running=1, prefix_slots=0)
    prompt = torch.randint(1000, 100000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    print(f"shape {args.shape}, {args.dtype}, {args.prompt_len}-token prompt, {args.new_tokens} greedy tokens, "
          f"{args.rounds} rounds")

    real_release = engine_module.release_openmp_pool
    modes = {"released": real_release, "never released": lambda: False}
    times = {(mode, path): [] for mode in modes for path in ("engine", "generate")}
    try:
        for round_ in range(args.rounds + 1):  # the first round warms up
            for mode, release in modes.items():
                engine_module.release_openmp_pool = release
                release()  # this thread, from the other mode's state
                # The engine first: it lets go of its pool when it goes idle after this request (in
                # the released mode), which the other mode's last request did not do.
                runs = {"engine": engine_ms(engine, prompt, args.new_tokens)}
                runs["generate"] = generate_ms(model, prompt, args.new_tokens)
                if round_:
                    for path, ms in runs.items():
                        times[mode, path].append(ms)
    finally:
        engine_module.release_openmp_pool = real_release
        engine.shutdown()
    print(f"OpenMP pool to release here: {real_release()}")
    print(f"\n{'pools':<16} {'path':<9} {'median ms/token':>16} {'min-max':>14} {'tok/s':>7}")
    medians = {}
    for (mode, path), values in times.items():
        medians[mode, path] = median = statistics.median(values)
        print(f"{mode:<16} {path:<9} {median:>16.2f} {f'{min(values):.1f}-{max(values):.1f}':>14} {1e3 / median:>7.2f}")
    print(f"\nreleased: engine / generate time per token {medians['released', 'engine'] / medians['released', 'generate']:.3f}; "
          f"never released / released: generate {medians['never released', 'generate'] / medians['released', 'generate']:.3f}, "
          f"engine {medians['never released', 'engine'] / medians['released', 'engine']:.3f}")

if __name__ == "__main__":
    main()
