"""Export to GGUF for llama.cpp: the file read back with gguf's reader (metadata from config.json, llama.cpp's
tensor names and shapes, values equal to the checkpoint's or their exact conversion, the vocabulary and its
merges giving QWenTokenizer's ids), refusals of bad input, and, where a llama.cpp build is at hand
(llama-cpp-python in its own virtualenv), the same token ids and the same 16 greedy tokens as our model."""

import itertools
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.convert_slow_tokenizer import bytes_to_unicode

import qwen
from qwen.tokenization_qwen import PAT_STR, SPECIAL_TOKENS, QWenTokenizer
from qwen.tools.export_gguf import export_gguf, main
from qwen.tools.tiny_checkpoint import build

gguf = pytest.importorskip("gguf")  # a test dependency (pyproject's `test` extra); importorskip names it

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTTYPES = ("f32", "f16", "bf16")
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
GGML_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气不错。",
    "def f(x):\n    return x * 2\n\n\nprint(f(21))",
    "  multiple   spaces\tand\ttabs\r\n  end ",
    "numbers 1234567890, 3.14159 and emoji 😀🎉",
    "It's we'll I'M YOU'RE they'd",
    "Ünïcödé façade naïve São Paulo Москва",
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An fp32 chat checkpoint with the real vocabulary (so f16/bf16 really round)."""
    return build(tmp_path_factory.mktemp("gguf_src") / "tiny-chat", chat=True, dtype="float32")


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """{outtype: path}; f16 through the command line, the others through export_gguf()."""
    root = tmp_path_factory.mktemp("gguf_out")
    paths = {}
    for outtype in ("f32", "bf16"):
        paths[outtype] = export_gguf(tiny, root / f"tiny-{outtype}.gguf", outtype)
    proc = run_cli(str(tiny), str(root / "tiny-f16.gguf"), "--outtype", "f16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {root / 'tiny-f16.gguf'} (f16, ")
    assert "[19/19] lm_head.weight -> output.weight" in proc.stderr  # progress, one line per tensor
    paths["f16"] = root / "tiny-f16.gguf"
    return paths


@pytest.fixture(scope="module")
def read_back(exports):
    """GGUFReader of the f32 file (~10 s and ~0.7 GB for the full vocabulary, so only this one: the
    other outtypes are checked against it through raw_metadata and quick_read)."""
    reader = gguf.GGUFReader(exports["f32"])
    yield reader
    del reader


@pytest.fixture(scope="module")
def checkpoint_tensors(tiny):
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return QWenTokenizer.from_pretrained(tiny)


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "qwen.tools.export_gguf", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


def field(reader, key):
    return reader.fields[key].contents()


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes


def quick_read(path, metadata=None):
    """(general.name, {tensor name: (ggml type name, numpy shape, data)}) of a GGUF file, without building
    GGUFReader's per-string objects (tens of seconds for a 151936-token vocabulary; the f32 file is read
    with GGUFReader itself). `metadata`, a dict, receives {key: (value type, raw value bytes)} in file order."""
    buf = memoryview(Path(path).read_bytes())
    assert bytes(buf[:4]) == b"GGUF"
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    assert version == 3
    pos = 24

    def string(pos):
        (n,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8"), pos + 8 + n

    def skip(vtype, pos):
        if vtype == 8:  # string
            return string(pos)[1]
        if vtype == 9:  # array
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item in _SCALAR_SIZES:
                return pos + count * _SCALAR_SIZES[item]
            for _ in range(count):
                pos = skip(item, pos)
            return pos
        return pos + _SCALAR_SIZES[vtype]

    name = None
    alignment = 32
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if key == "general.name":
            name = string(pos)[0]
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", buf, pos)
        end = skip(vtype, pos)
        if metadata is not None:
            metadata[key] = (vtype, bytes(buf[pos:end]))
        pos = end
    infos = []
    for _ in range(n_tensors):
        tname, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((tname, gguf.GGMLQuantizationType(ggml_type), tuple(reversed(dims)), offset))
    start = -(-pos // alignment) * alignment
    np_types = {"F32": np.float32, "F16": np.float16, "BF16": np.int16}
    tensors = {}
    for tname, ggml_type, shape, offset in infos:
        dtype = np.dtype(np_types[ggml_type.name])
        count = int(np.prod(shape))
        data = np.frombuffer(buf, dtype=dtype, count=count, offset=start + offset).reshape(shape)
        tensor = torch.from_numpy(data.copy())
        tensors[tname] = (ggml_type.name, shape, tensor.view(torch.bfloat16) if ggml_type.name == "BF16" else tensor)
    return name, tensors


def tensor_data(t):
    """A GGUFReader tensor as a torch tensor (numpy shape: [out, in]); BF16 comes as raw bytes."""
    data = torch.from_numpy(np.array(t.data))
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        data = data.view(torch.int16).view(torch.bfloat16)
    return data


# ----------------------------------------------------------------------------- metadata


def test_metadata_from_config(read_back, tiny):
    r = read_back
    config = json.loads((tiny / "config.json").read_text())
    assert field(r, "general.architecture") == "qwen"
    assert field(r, "general.name") == "tiny-chat"
    assert field(r, "general.file_type") == 0  # f32
    assert field(r, "qwen.context_length") == config["seq_length"] == 2048
    assert field(r, "qwen.embedding_length") == config["hidden_size"] == 64
    assert field(r, "qwen.block_count") == config["num_hidden_layers"] == 2
    # llama.cpp's Qwen loader makes each SwiGLU branch feed_forward_length / 2 wide.
    assert field(r, "qwen.feed_forward_length") == config["intermediate_size"] == 340
    assert field(r, "qwen.attention.head_count") == field(r, "qwen.attention.head_count_kv") == 4
    assert field(r, "qwen.rope.dimension_count") == 16  # head_dim, rotary_pct 1
    assert field(r, "qwen.rope.freq_base") == config["rotary_emb_base"] == 10000
    # The key llama.cpp's own converter omits for Qwen v1 (its loader requires it).
    assert field(r, "qwen.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6, rel=1e-7)
    assert r.fields["qwen.attention.layer_norm_rms_epsilon"].types == [gguf.GGUFValueType.FLOAT32]
    assert field(r, "qwen.vocab_size") == 151936


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_other_outtypes_carry_the_same_metadata(exports, outtype):
    """Every key and value of the f32 file (GGUFReader-checked above and below), in the same order, but
    general.file_type (llama_ftype: 1 MOSTLY_F16, 32 MOSTLY_BF16)."""
    reference, other = {}, {}
    quick_read(exports["f32"], reference)
    quick_read(exports[outtype], other)
    assert list(other) == list(reference)
    assert other.pop("general.file_type") == (4, struct.pack("<I", {"f16": 1, "bf16": 32}[outtype]))
    assert reference.pop("general.file_type") == (4, struct.pack("<I", 0))
    assert other == reference


def test_tokenizer_metadata(read_back, tokenizer):
    r = read_back
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "qwen2"
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        assert field(r, f"tokenizer.ggml.{key}") == 151643
    assert field(r, "tokenizer.ggml.add_bos_token") is False and field(r, "tokenizer.ggml.add_eos_token") is False
    assert "<|im_start|>" in field(r, "tokenizer.chat_template")

    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 151936  # the embedding's rows, padded past the tokenizer's 151851
    assert r.fields["tokenizer.ggml.token_type"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert len(set(tokens)) == len(tokens)  # llama.cpp maps text -> id
    normal, control, unused = (int(t) for t in (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.UNUSED))
    assert set(types[:151643]) == {normal}
    assert types[151643:151851] == [control] * 208
    assert set(types[151851:]) == {unused} and tokens[151851] == "[PAD151851]"
    for text, token_id in SPECIAL_TOKENS.items():
        assert tokens[token_id] == text
    assert tokens[151644:151647] == ["<|im_start|>", "<|im_end|>", "<|extra_0|>"]

    # Each regular token's text is its bytes in GPT-2's byte-to-unicode form.
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    ids = random.Random(0).sample(range(151643), 3000) + [0, 198, 220, 151642]
    for token_id in ids:
        assert bytes(decoder[c] for c in tokens[token_id]) == tokenizer.convert_ids_to_tokens(token_id), token_id


def _bpe(text, ranks, ids, encoder):
    """Byte-level BPE as llama.cpp runs it: Qwen's pre-tokenizer regex, then merges by their rank (index)."""
    out = []
    for piece in regex.findall(PAT_STR, text):
        word = [encoder[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [ranks.get((a, b)) for a, b in itertools.pairwise(word)]
            known = [(rank, i) for i, rank in enumerate(pairs) if rank is not None]
            if not known:
                break
            _, i = min(known)
            word[i:i + 2] = [word[i] + word[i + 1]]
        out += [ids[w] for w in word]
    return out


def test_merges_reproduce_our_token_ids(read_back, tokenizer):
    r = read_back
    tokens = field(r, "tokenizer.ggml.tokens")
    merges = field(r, "tokenizer.ggml.merges")
    assert all(m.count(" ") == 1 for m in merges[:1000])
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens[:151643])}
    assert all(a + b in ids for a, b in list(ranks)[:: max(1, len(ranks) // 5000)])  # merges make tokens
    encoder = bytes_to_unicode()
    for text in TEXTS:
        assert _bpe(text, ranks, ids, encoder) == tokenizer.encode(text), text


# ----------------------------------------------------------------------------- tensors


def expected_names(layers):
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(layers):
        names |= {f"blk.{i}.{n}" for n in ("attn_norm.weight", "attn_qkv.weight", "attn_qkv.bias",
                                          "attn_output.weight", "ffn_norm.weight", "ffn_up.weight",
                                          "ffn_gate.weight", "ffn_down.weight")}
    return names


SOURCE = {  # GGUF name -> checkpoint name (w2 is the SiLU-gated branch: the gate)
    "token_embd.weight": "transformer.wte.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "transformer.h.{i}.ln_1.weight",
    "blk.{i}.attn_qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
    "blk.{i}.attn_qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
    "blk.{i}.attn_output.weight": "transformer.h.{i}.attn.c_proj.weight",
    "blk.{i}.ffn_norm.weight": "transformer.h.{i}.ln_2.weight",
    "blk.{i}.ffn_up.weight": "transformer.h.{i}.mlp.w1.weight",
    "blk.{i}.ffn_gate.weight": "transformer.h.{i}.mlp.w2.weight",
    "blk.{i}.ffn_down.weight": "transformer.h.{i}.mlp.c_proj.weight",
}


def source_name(gguf_name):
    if gguf_name.startswith("blk."):
        layer = gguf_name.split(".")[1]
        return SOURCE["blk.{i}." + gguf_name.split(".", 2)[2]].format(i=layer)
    return SOURCE[gguf_name]


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_tensors(exports, outtype, checkpoint_tensors):
    _, tensors = quick_read(exports[outtype])
    assert set(tensors) == expected_names(2)
    assert list(tensors)[0] == "token_embd.weight" and list(tensors)[-1] == "output.weight"
    ggml_shapes = {  # llama.cpp's create_tensor shapes (ne order: the inner dimension first)
        "token_embd.weight": [64, 151936], "output.weight": [64, 151936], "output_norm.weight": [64],
        "blk.0.attn_qkv.weight": [64, 192], "blk.0.attn_qkv.bias": [192], "blk.0.attn_output.weight": [64, 64],
        "blk.0.ffn_gate.weight": [64, 170], "blk.0.ffn_up.weight": [64, 170], "blk.0.ffn_down.weight": [170, 64],
        "blk.1.attn_norm.weight": [64], "blk.1.ffn_norm.weight": [64],
    }
    target = TORCH_DTYPES[outtype]
    for name, (ggml_type, shape, data) in tensors.items():
        source = checkpoint_tensors[source_name(name)]
        if name in ggml_shapes:
            assert list(reversed(shape)) == ggml_shapes[name], name
        if source.dim() == 1:  # norms and the qkv bias stay F32 in every outtype
            assert ggml_type == "F32", name
            expected = source.float()
        else:
            assert ggml_type == GGML_TYPES[outtype], name
            expected = source.to(target)
        assert tuple(data.shape) == tuple(source.shape), name
        assert torch.equal(data, expected), name


def test_gguf_reader_reads_the_f32_tensors(read_back, exports, checkpoint_tensors):
    """gguf's own reader finds in the f32 file what quick_read finds; the mapping, spelled out on these
    exact copies."""
    r = read_back
    _, tensors = quick_read(exports["f32"])
    assert [t.name for t in r.tensors] == list(tensors)
    for t in r.tensors:
        assert t.tensor_type.name == tensors[t.name][0] and torch.equal(tensor_data(t), tensors[t.name][2]), t.name
    data = {t.name: tensor_data(t) for t in r.tensors}
    assert torch.equal(data["blk.1.ffn_gate.weight"], checkpoint_tensors["transformer.h.1.mlp.w2.weight"])
    assert torch.equal(data["blk.1.ffn_up.weight"], checkpoint_tensors["transformer.h.1.mlp.w1.weight"])
    assert torch.equal(data["blk.1.ffn_down.weight"], checkpoint_tensors["transformer.h.1.mlp.c_proj.weight"])
    assert torch.equal(data["blk.0.attn_qkv.bias"], checkpoint_tensors["transformer.h.0.attn.c_attn.bias"])
    assert torch.equal(data["token_embd.weight"], checkpoint_tensors["transformer.wte.weight"])
    assert torch.equal(data["output.weight"], checkpoint_tensors["lm_head.weight"])


def test_bf16_checkpoint_to_every_outtype(tmp_path):
    """A bf16 checkpoint (as published): bf16 and f32 outputs are exact copies."""
    src = build(tmp_path / "bf16-src", layers=1, seed=3)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        wte = f.get_tensor("transformer.wte.weight")
    assert wte.dtype == torch.bfloat16
    for outtype in OUTTYPES:
        out = export_gguf(src, tmp_path / f"{outtype}.gguf", outtype)
        ggml_type, shape, data = quick_read(out)[1]["token_embd.weight"]
        assert (ggml_type, shape) == (GGML_TYPES[outtype], (151936, 64))
        assert torch.equal(data, wte.to(TORCH_DTYPES[outtype])), outtype


# ----------------------------------------------------------------------------- refusals and output handling


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs(tiny, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert "not a checkpoint directory" in _error(capsys, [str(tmp_path / "missing"), str(out)])

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in _error(capsys, [str(empty), str(out)])

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert "not a Qwen (v1) model" in _error(capsys, [str(llama), str(out)])

    no_vocab = tmp_path / "no_vocab"
    no_vocab.mkdir()
    (no_vocab / "config.json").write_bytes((tiny / "config.json").read_bytes())
    assert "qwen.tiktoken" in _error(capsys, [str(no_vocab), str(out)])

    with pytest.raises(SystemExit) as exc:
        main([str(tiny), str(out), "--outtype", "q4_0"])
    assert exc.value.code == 2 and "invalid choice: 'q4_0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown outtype"):
        export_gguf(tiny, out, "f64")
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))


def test_existing_output_needs_force(tiny, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    assert "exists: pass --force" in _error(capsys, [str(tiny), str(out)])
    assert out.read_bytes() == b"old"
    assert main([str(tiny), str(out), "--outtype", "bf16", "--force", "--name", "my-model"]) == 0
    assert "wrote" in capsys.readouterr().out
    name, tensors = quick_read(out)
    assert name == "my-model" and tensors["output.weight"][0] == "BF16"
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # an ordinary file, not mkstemp's private one

    assert "is a directory" in _error(capsys, [str(tiny), str(tmp_path)])
    assert not list(tmp_path.glob(".*.partial"))


def test_output_inside_the_source(tiny, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for p in tiny.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    weights = (src / "model.safetensors").read_bytes()
    # Overwriting a file the export reads is refused, even with --force.
    for name in ("model.safetensors", "qwen.tiktoken", "config.json"):
        assert "file of the source checkpoint" in _error(capsys, [str(src), str(src / name), "--force"])
    assert (src / "model.safetensors").read_bytes() == weights
    # A new file next to the checkpoint is fine.
    assert main([str(src), str(src / "model-f16.gguf")]) == 0
    name, tensors = quick_read(src / "model-f16.gguf")
    assert name == "src" and len(tensors) == 19 and tensors["token_embd.weight"][0] == "F16"
    assert (src / "model.safetensors").read_bytes() == weights


def test_unsupported_checkpoints(tiny, tmp_path, capsys):
    def variant(name, edit_config=None, edit_tensors=None):
        d = tmp_path / name
        d.mkdir()
        for p in tiny.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        if edit_config:
            config = json.loads((d / "config.json").read_text())
            edit_config(config)
            (d / "config.json").write_text(json.dumps(config))
        if edit_tensors:
            with safe_open(str(d / "model.safetensors"), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            edit_tensors(tensors)
            save_file(tensors, str(d / "model.safetensors"))
        return str(d)

    out = str(tmp_path / "out.gguf")
    assert "no_bias=False" in _error(capsys, [variant("bias", lambda c: c.update(no_bias=False)), out])
    assert "window_attn_sizes" in _error(
        capsys, [variant("window", lambda c: c.update(window_attn_sizes=[0, 64])), out])
    assert "transformer.h.0.attn.c_attn.qweight" in _error(capsys, [variant(
        "gptq", edit_tensors=lambda t: t.update({"transformer.h.0.attn.c_attn.qweight": torch.zeros(8, 192,
                                                                                               dtype=torch.int32)})),
        out])
    assert "lacks 1 tensor" in _error(capsys, [variant("missing", edit_tensors=lambda t: t.pop("lm_head.weight")), out])
    assert "has shape" in _error(capsys, [variant("shape", lambda c: c.update(intermediate_size=256)), out])
    assert not Path(out).exists() and not list(tmp_path.glob(".*.partial"))


def test_interrupted_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    from qwen.tools import export_gguf as module

    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(module, "_to_numpy", broken)
    with pytest.raises(OSError, match="simulated"):
        export_gguf(tiny, out, "f32", force=True)
    assert out.read_bytes() == b"old" and not list(tmp_path.glob(".*.partial"))


# ----------------------------------------------------------------------------- llama.cpp itself

LLAMA_PYTHON = os.environ.get("QWEN_LLAMA_PYTHON", "/tmp/llama_venv/bin/python")
LLAMA_SETUP = ("python3 -m venv /tmp/llama_venv && CMAKE_BUILD_PARALLEL_LEVEL=2 "
               "/tmp/llama_venv/bin/pip install llama-cpp-python==0.3.36 numpy  (builds llama.cpp, ~15 min)")
PROMPTS = ["Hello, world!", "The quick brown fox", "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
           "def f(x):\n    return x * 2", " ".join(TEXTS * 3)]  # the last: ~250 tokens, RoPE at larger positions
NEW_TOKENS = 16

# Runs in the llama.cpp virtualenv: tokenize, then greedy decoding by argmax over llama.cpp's logits (the
# KV cache in F32, so nothing is rounded to 16 bits on either side). Prints JSON.
LLAMA_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import llama_cpp

    args = json.load(open(sys.argv[1]))
    llm = llama_cpp.Llama(model_path=args["model"], logits_all=False, n_ctx=512, n_batch=512, n_threads=2,
                          type_k=0, type_v=0, verbose=False)  # 0 = GGML_TYPE_F32
    out = {"n_vocab": llm.n_vocab(), "n_ctx_train": llm._model.n_ctx_train(),
           "arch": llm.metadata.get("general.architecture"),
           "tokens": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in args["texts"]],
           "plain": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in args["plain_texts"]],
           "generated": [], "top": []}
    for prompt in args["prompts"]:
        llm.reset()
        llm.eval(prompt)
        ids, top = [], []
        for _ in range(args["new_tokens"]):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            best = np.argsort(-logits, kind="stable")[:5]
            top.append([[int(i), float(logits[i])] for i in best])
            ids.append(int(best[0]))
            llm.eval([ids[-1]])
        out["generated"].append(ids)
        out["top"].append(top)
    out["others"] = {}
    for name, path in args["others"].items():  # the 16-bit files load and compute (nearly) the same logits
        other = llama_cpp.Llama(model_path=path, logits_all=False, n_ctx=64, n_threads=2, verbose=False)
        other.eval(args["prompts"][0])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(other.ctx, -1), shape=(other.n_vocab(),))
        out["others"][name] = [[int(i), float(logits[i])] for i in np.argsort(-logits, kind="stable")[:5]]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def llama_python():
    if not os.path.exists(LLAMA_PYTHON):
        pytest.skip(f"no llama.cpp virtualenv at {LLAMA_PYTHON} (set QWEN_LLAMA_PYTHON, or create it: {LLAMA_SETUP})")
    probe = subprocess.run([LLAMA_PYTHON, "-c", "import llama_cpp"], check=False, capture_output=True, text=True, timeout=120)
    if probe.returncode:
        pytest.skip(f"llama_cpp does not import in {LLAMA_PYTHON} (still building? {LLAMA_SETUP}): "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
    return LLAMA_PYTHON


@torch.no_grad()
def our_greedy(model, prompt, new_tokens):
    """(ids, per-step logits) by argmax with the KV cache, never stopping at an end token (as llama.cpp's loop)."""
    ids, steps, past = [], [], None
    x = torch.tensor([prompt])
    for _ in range(new_tokens):
        result = model(input_ids=x, past_key_values=past, use_cache=True)
        past = result.past_key_values
        logits = result.logits[0, -1]
        steps.append(logits)
        ids.append(int(logits.argmax()))
        x = torch.tensor([[ids[-1]]])
    return ids, steps


def test_llama_cpp_same_tokens_and_greedy_output(llama_python, tiny, exports, tokenizer, tmp_path):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    texts = TEXTS + PROMPTS + ["print(\"<|endoftext|>\")"]
    args = tmp_path / "args.json"
    # llama.cpp (this version) makes any token whose text is "</s>" a control/end-of-generation token, and Qwen
    # has a regular one (128247): with special-token parsing, "</s>" in the text becomes that id, which
    # tiktoken never gives. Without it, the ids are ours.
    plain_texts = ["a</s>b", "<del>x</del> <s>y</s>", *TEXTS[:3]]
    args.write_text(json.dumps({"model": str(exports["f32"]), "texts": texts, "prompts": prompts,
                                "plain_texts": plain_texts, "new_tokens": NEW_TOKENS,
                                "others": {k: str(exports[k]) for k in ("f16", "bf16")}}))
    script = tmp_path / "run_llama.py"
    script.write_text(LLAMA_SCRIPT)
    proc = subprocess.run([llama_python, str(script), str(args)], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert theirs["arch"] == "qwen" and theirs["n_vocab"] == 151936 and theirs["n_ctx_train"] == 2048

    for text, ids in zip(texts, theirs["tokens"]):
        assert ids == tokenizer.encode(text), text  # identical ids, control tokens included
    assert theirs["tokens"][-1] == [1350, 445, 151643, 899]
    for text, ids in zip(plain_texts, theirs["plain"]):
        assert ids == tokenizer.encode(text, allowed_special=set()), text

    model = qwen.QWenLMHeadModel.from_pretrained(tiny).eval()
    assert next(model.parameters()).dtype == torch.float32
    report = []
    for prompt, generated, top in zip(prompts, theirs["generated"], theirs["top"]):
        ours, steps = our_greedy(model, prompt, NEW_TOKENS)
        assert len(set(ours)) > NEW_TOKENS // 2  # not a degenerate repetition
        # llama.cpp's logits at its top-5 ids against ours (reported on failure).
        diff = max(abs(steps[s][i].item() - value) for s in range(len(top)) for i, value in top[s]
                   if s < len(steps) and (generated[:s] == ours[:s]))
        margin = min(float(l.topk(2).values[0] - l.topk(2).values[1]) for l in steps)
        report.append(f"prompt {prompt[:4]}...: ours {ours}, llama.cpp {generated}, max |logit diff| {diff:.2e}, "
                      f"smallest top-2 margin {margin:.2e}")
        assert generated == ours, "\n".join(report)
        assert diff < 1e-4, "\n".join(report)  # the same function in fp32, up to summation order
    first_step = [i for i, _ in theirs["top"][0][0]]
    for name, top in theirs["others"].items():
        # 16-bit weights (and, in llama.cpp's F16 path, 16-bit activations) move the logits by ~1e-3:
        # the best id stays among the f32 file's top 5 and the values are close.
        assert top[0][0] in first_step, (name, top, theirs["top"][0][0])
        assert abs(top[0][1] - theirs["top"][0][0][0][1]) < 0.05, (name, top, theirs["top"][0][0])
        report.append(f"{name}: first-step top-5 {top}")
    print("\n".join(report))
