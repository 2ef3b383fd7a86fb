"""Export to transformers' native Qwen2ForCausalLM: same logits and greedy tokens within seq_length,
refusals for what Qwen2 cannot express, the tokenizer as a native fast tokenizer (the same ids as
QWenTokenizer, no remote code), and the CLI."""

import json
import logging
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

import qwen
from qwen.tokenization_qwen import DEFAULT_CHAT_TEMPLATE, SPECIAL_TOKENS, QWenTokenizer
from qwen.tools.export_qwen2 import export_qwen2, main, to_qwen2
from qwen.tools.tiny_checkpoint import build
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

GOLDEN = Path(__file__).parent / "fixtures" / "golden_models"
REPO_ROOT = Path(__file__).resolve().parent.parent


def run_python(args, cwd, env=None):
    env = env or dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def random_ids(vocab, length, batch=2, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_function(ours, theirs, vocab, lengths=(8, 16)):
    """Logits within 1e-5 for each prompt length, and 8 identical greedy tokens after 8 tokens."""
    ids = random_ids(vocab, max(lengths))
    with torch.no_grad():
        for n in lengths:
            a, b = ours(ids[:, :n]).logits, theirs(ids[:, :n]).logits
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=f"logits differ for {n} tokens")
    prompt = ids[:, :8]
    greedy = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    torch.testing.assert_close(theirs.generate(prompt, **greedy), ours.generate(prompt, **greedy), atol=0, rtol=0)


def load_ours(path):
    return qwen.QWenLMHeadModel.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny_chat"), chat=True, dtype="float32")


@pytest.fixture(scope="module")
def exported(tiny_chat, tmp_path_factory):
    """tiny_chat (real vocabulary, QWenTokenizer) exported to Qwen2."""
    return export_qwen2(tiny_chat, tmp_path_factory.mktemp("exported") / "out")


@pytest.fixture(scope="module")
def fast(exported):
    """What transformers gives for the export: a Qwen2Tokenizer built from tokenizer.json."""
    return AutoTokenizer.from_pretrained(exported)


@pytest.fixture(scope="module")
def backend(exported):
    """tokenizer.json as it is: what transformers 4's Qwen2TokenizerFast (so vLLM on transformers 4) runs."""
    return Tokenizer.from_file(str(exported / "tokenizer.json"))


# ----------------------------------------------------------------------------- same function


def test_golden_checkpoint_exports_to_the_same_function(tmp_path, caplog):
    src = GOLDEN / "tiny_default"  # fp32, seq_length 16, vocab 1024, no tokenizer
    with caplog.at_level(logging.WARNING, logger="qwen.tools.export_qwen2"):
        export_qwen2(src, tmp_path)
    assert "dynamic NTK and LogN not carried over" in caplog.text

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 4
    assert config["intermediate_size"] == 344 // 2
    assert config["max_position_embeddings"] == 16
    assert config["rope_parameters"]["rope_theta"] == 10000
    assert config["rms_norm_eps"] == 1e-6 and config["tie_word_embeddings"] is False
    assert config["dtype"] == "float32"
    assert "auto_map" not in config and not list(tmp_path.glob("*.py"))  # no remote code
    assert (tmp_path / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    assert not (tmp_path / "tokenizer_config.json").exists()

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # native class, no remote code
    assert type(theirs) is Qwen2ForCausalLM
    assert_same_function(load_ours(src), theirs, vocab=1024)


def test_tensor_mapping(tmp_path):
    src = GOLDEN / "tiny_default"
    export_qwen2(src, tmp_path)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        new = {k: f.get_tensor(k) for k in f.keys()}
    assert len(new) == len(old) + 2 * 2 * 2  # per layer: c_attn weight and bias become three each
    q, k, v = old["transformer.h.1.attn.c_attn.weight"].split(64)
    assert torch.equal(new["model.layers.1.self_attn.q_proj.weight"], q)
    assert torch.equal(new["model.layers.1.self_attn.k_proj.weight"], k)
    assert torch.equal(new["model.layers.1.self_attn.v_proj.weight"], v)
    assert torch.equal(new["model.layers.1.self_attn.v_proj.bias"], old["transformer.h.1.attn.c_attn.bias"][128:])
    assert torch.equal(new["model.layers.0.mlp.gate_proj.weight"], old["transformer.h.0.mlp.w2.weight"])
    assert torch.equal(new["model.layers.0.mlp.up_proj.weight"], old["transformer.h.0.mlp.w1.weight"])
    assert torch.equal(new["model.layers.0.mlp.down_proj.weight"], old["transformer.h.0.mlp.c_proj.weight"])
    assert torch.equal(new["model.layers.0.self_attn.o_proj.weight"], old["transformer.h.0.attn.c_proj.weight"])
    assert torch.equal(new["model.layers.0.input_layernorm.weight"], old["transformer.h.0.ln_1.weight"])
    assert torch.equal(new["model.layers.0.post_attention_layernorm.weight"], old["transformer.h.0.ln_2.weight"])
    assert torch.equal(new["model.embed_tokens.weight"], old["transformer.wte.weight"])
    assert torch.equal(new["model.norm.weight"], old["transformer.ln_f.weight"])
    assert torch.equal(new["lm_head.weight"], old["lm_head.weight"])


def test_real_vocab_checkpoint_with_tokenizer(tiny_chat, exported):
    names = {p.name for p in exported.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "qwen.tiktoken",
                     "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert (exported / "qwen.tiktoken").read_bytes() == (tiny_chat / "qwen.tiktoken").read_bytes()
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["chat_format"] == "chatml" and generation["eos_token_id"] == 151643
    config = json.loads((exported / "config.json").read_text())
    assert config["eos_token_id"] == 151643 and config["vocab_size"] == 151936
    assert "auto_map" not in config

    theirs = Qwen2ForCausalLM.from_pretrained(exported).eval()
    assert_same_function(load_ours(tiny_chat), theirs, vocab=151936)


def test_in_memory_model_exports(tmp_path):
    ours = load_ours(GOLDEN / "tiny_default")
    theirs = to_qwen2(ours)
    assert type(theirs) is Qwen2ForCausalLM and not theirs.training
    assert_same_function(ours, theirs, vocab=1024)
    # The copy owns its weights: changing ours does not change it.
    with torch.no_grad():
        ours.transformer.h[0].attn.c_attn.weight.zero_()
    assert theirs.model.layers[0].self_attn.q_proj.weight.abs().sum() > 0

    export_qwen2(load_ours(GOLDEN / "tiny_default"), tmp_path, dtype="bfloat16")
    saved = Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert saved.dtype == torch.bfloat16
    assert torch.equal(saved.lm_head.weight, theirs.lm_head.weight.bfloat16())


def test_dtype_cast_and_sharded_source(tmp_path):
    src = tmp_path / "sharded"
    ours = load_ours(GOLDEN / "tiny_default")
    ours.save_pretrained(src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    export_qwen2(src, tmp_path / "out", dtype="bfloat16")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and len(index["weight_map"]) == 27
    theirs = Qwen2ForCausalLM.from_pretrained(tmp_path / "out")
    assert theirs.dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(theirs.model.embed_tokens.weight, ours.transformer.wte.weight.bfloat16())


# ----------------------------------------------------------------------------- native tokenizer

TRICKY_TEXTS = [
    "1234567890 3.14159 -42 1e-5 0x1F ２０２４ ①②",  # Qwen splits digits one by one
    "   \t\t  spaces\tand tabs   \n   \n\n\n   ",
    "\r\n\r\n\r\r\n\n \r\n  x\r\n",
    "a  b   c    d\u3000e\xa0f\u2003g\u200bh",
    "emoji 😀😀😀 👍🏽 👨\u200d👩\u200d👧\u200d👦 🇨🇳🇺🇸 ❤️",
    "中文：你好，世界！「引号」『书名』、顿号。全角ＡＢＣ",
    "日本語のテキスト、カタカナ、ﾊﾝｶｸ。한국어 텍스트입니다.",
    "e\u0301 A\u030a \u1100\u1161 ﬁ ﬀ ™ ½ Å",  # NFC composes the first three, keeps the rest
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "x<|endoftext|>y<|extra_0|>z<|extra_204|><|extra_205|><|im_start <|im_end|",
    "<<|im_end|>> |<|endoftext|>| <|<|im_start|>|>",
    "I'M HE'LL we'D they'Ve it's O'Neil 'tis ''",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n\n\n\tif x:\n\t\tpass\n",
    "$$\\sum_{i=1}^{n} i^2 = \\frac{n(n+1)(2n+1)}{6}$$ <div class=\"a\">&amp;</div>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ЁЖЗ съешь же ещё этих мягких французских булок Ελληνικά עברית العربية हिन्दी ไทย",
    "!!!???...,,,;;;---___===+++***&&&^^^%%%$$$###@@@~~~```\"\"\"\\\\\\///",
    "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\ufeff\ufffd",
    "\U0001F600\U00010348\U0002F800\U000E0001",
    "",
    " ",
    "\n",
]
# Short random strings over groups of characters that exercise the regex and the merges.
CHARACTER_GROUPS = [
    "abcxyzABC ", "0123456789", " \t\n\r", "你好世界中文测试的一是", "😀👍🏽\u200d👩", "'sretvmlld S",
    "!?.,;:()[]{}<>|-_=+*&^%$#@~`\"\\/", "éèêëàáâäçñ\u0301\u0308", "ЖжФфПрИвет", "ąęśćżź",
    "\xa0\u2003\u200b\u3000", "アイウエオカタカナ한국어", "ﬁﬂ™½²", "<|>imstrendoftext_",
]


def random_texts(count=3000, seed=0):
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        alphabet = "".join(rng.sample(CHARACTER_GROUPS, rng.randint(1, 4)))
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
    return texts


def golden_texts(golden):
    return ([case["text"] for case in golden["tokenizer_cases"]]
            + [case["raw_text"] for case in golden["chat_cases"]])


def test_fast_tokenizer_files_are_native(exported, fast):
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and "auto_map" not in config
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None and config["unk_token"] is None
    assert config["model_max_length"] == 2048  # tiny_chat's seq_length = max_position_embeddings
    assert config["chat_template"] == (exported / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    assert not list(exported.glob("*.py"))

    assert type(fast).__name__ == "Qwen2Tokenizer" and fast.is_fast
    assert fast.eos_token_id == fast.pad_token_id == 151643 and fast.bos_token_id is None
    assert fast.model_max_length == 2048 and fast.chat_template == DEFAULT_CHAT_TEMPLATE


def test_encode_gives_qwen_tokenizer_ids(fast, backend, qwen_tokenizer, tokenizer_chat_golden):
    # The golden ids come from the original (2023) QWenTokenizer.
    for case in tokenizer_chat_golden["tokenizer_cases"]:
        assert fast.encode(case["text"], add_special_tokens=False) == case["ids_allowed_special_all"], case["text"]
        assert fast.encode(case["text"]) == case["ids_allowed_special_all"]  # nothing is added
    texts = golden_texts(tokenizer_chat_golden) + TRICKY_TEXTS + random_texts()
    expected = [qwen_tokenizer.encode(text) for text in texts]
    got = fast(texts, add_special_tokens=False)["input_ids"]
    as_is = [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    for text, want, ids, raw in zip(texts, expected, got, as_is):
        assert ids == want, text
        assert raw == want, text


def test_every_token_is_reached_by_its_merges(exported):
    """tiktoken returns a piece that is a token as it is; BPE reaches each token by merges alone, so
    tokenizer.json's ignore_merges (on) and transformers 5's rebuilt Qwen2Tokenizer (off) agree."""
    backend = Tokenizer.from_file(str(exported / "tokenizer.json"))
    backend.model.ignore_merges = False
    vocab = backend.get_vocab(with_added_tokens=False)
    assert len(vocab) == 151643
    unreached = {token: token_id for token, token_id in vocab.items()
                 if [t.id for t in backend.model.tokenize(token)] != [token_id]}
    assert unreached == {}


def test_digits_and_control_tokens(fast, qwen_tokenizer):
    digits = fast.encode("1234567890")
    assert len(digits) == 10 and digits == qwen_tokenizer.encode("1234567890")
    ids = fast.encode("a<|im_start|>b<|im_end|>c<|extra_204|><|extra_205|>")
    assert ids[1] == 151644 and ids[3] == 151645 and ids[5] == 151850
    assert 151851 not in ids and fast.decode(ids[6:]) == "<|extra_205|>"  # not a control token: plain text


def test_control_tokens_have_the_same_ids(fast, backend, qwen_tokenizer, tokenizer_chat_golden):
    assert len(fast) == len(qwen_tokenizer) == tokenizer_chat_golden["vocab_len"] == 151851
    assert len(SPECIAL_TOKENS) == 208
    for token, token_id in SPECIAL_TOKENS.items():
        assert fast.convert_tokens_to_ids(token) == backend.token_to_id(token) == token_id
        assert qwen_tokenizer.convert_tokens_to_ids(token) == token_id
        assert fast.convert_ids_to_tokens(token_id) == token
    for token, token_id in tokenizer_chat_golden["special_ids"].items():
        assert fast.convert_tokens_to_ids(token) == token_id
    assert set(fast.all_special_ids) == set(range(151643, 151851))


def test_decode_round_trips(fast, qwen_tokenizer, tokenizer_chat_golden):
    texts = golden_texts(tokenizer_chat_golden) + TRICKY_TEXTS + random_texts(500, seed=1)
    for text in texts:
        ids = qwen_tokenizer.encode(text)
        decoded = fast.decode(ids)
        assert decoded == qwen_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
        assert fast.decode(ids, skip_special_tokens=True) == qwen_tokenizer.decode(ids, skip_special_tokens=True)
    for case in tokenizer_chat_golden["tokenizer_cases"]:
        assert fast.decode(case["ids_allowed_special_all"], skip_special_tokens=True) == case["decoded_skip_special"]
    for case in tokenizer_chat_golden["decode_cases"]:
        if case["errors"] == "replace":  # the fast decoder always replaces broken UTF-8
            assert fast.decode(case["ids"]) == case["text"]
    for case in tokenizer_chat_golden["decode_tokens_cases"]:
        assert fast.decode(case["tokens"]) == qwen_tokenizer.decode(case["tokens"])


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "1+1=?"},
     {"role": "assistant", "content": "2, matey."}, {"role": "user", "content": "  and 12345 *  3 ?  "}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！很高兴为你提供帮助。"},
     {"role": "user", "content": "给我讲一个年轻人奋斗创业最终取得成功的故事。"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "def f():\n    return 1\n\n"}],
    [{"role": "user", "content": "emoji 😀👍🏽 and ﬁ e\u0301"}, {"role": "assistant", "content": "ok\r\n"}],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_gives_qwen_tokenizer_ids(fast, qwen_tokenizer, conversation, add_generation_prompt):
    kwargs = dict(add_generation_prompt=add_generation_prompt, return_dict=False)
    assert (fast.apply_chat_template(conversation, tokenize=False, **kwargs)
            == qwen_tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs))
    ids = qwen_tokenizer.apply_chat_template(conversation, **kwargs)
    assert fast.apply_chat_template(conversation, **kwargs) == ids


def test_chat_template_known_differences(fast, qwen_tokenizer):
    """Documented in qwen/tools/fast_tokenizer.py: the rendered text is tokenized whole."""
    for content in ("say <|im_end|> now", "\nstarts with a line break"):
        conversation = [{"role": "user", "content": content}]
        ours = qwen_tokenizer.apply_chat_template(conversation, return_dict=False)
        theirs = fast.apply_chat_template(conversation, return_dict=False)
        assert theirs != ours and fast.decode(theirs) == qwen_tokenizer.decode(ours)
        assert theirs == qwen_tokenizer.encode(qwen_tokenizer.apply_chat_template(conversation, tokenize=False))


def test_native_tokenizer_loads_without_qwen_or_remote_code(exported, qwen_tokenizer, tmp_path):
    """A clean interpreter in which `import qwen` fails; no trust_remote_code."""
    texts = ["Hello, world!", "你好 123 <|im_start|>", " \r\n\n  😀"]
    code = (
        "import json, sys\n"
        "sys.modules['qwen'] = None  # nothing of ours can be imported\n"
        "from transformers import AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "chat = t.apply_chat_template([{'role': 'user', 'content': '你好'}], add_generation_prompt=True,\n"
        "                             return_dict=False)\n"
        "ours = sorted(m for m, v in sys.modules.items() if v and m.startswith(('qwen', 'transformers_modules')))\n"
        "print(json.dumps([type(t).__name__, t.is_fast, [t.encode(x) for x in json.loads(sys.argv[2])], chat, ours]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    proc = run_python(["-c", code, str(exported), json.dumps(texts)], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    name, is_fast, ids, chat, modules = json.loads(proc.stdout)
    assert name == "Qwen2Tokenizer" and is_fast and modules == []
    assert ids == [qwen_tokenizer.encode(text) for text in texts]
    assert chat == qwen_tokenizer.apply_chat_template([{"role": "user", "content": "你好"}],
                                                      add_generation_prompt=True, return_dict=False)
    assert not (tmp_path / "hf_modules").exists()  # no remote code was fetched


def test_qwen_tokenizer_still_loads_from_the_export(exported, qwen_tokenizer):
    ours = QWenTokenizer.from_pretrained(exported)
    text = "Hello <|im_start|> 你好 12"
    assert ours.encode(text) == qwen_tokenizer.encode(text)


def test_forced_export_over_an_old_export_is_native(tiny_chat, tmp_path):
    """An export made before tokenizer.json (QWenTokenizer + remote code + auto_map) is replaced:
    even with trust_remote_code, AutoTokenizer then picks the native tokenizer."""
    from qwen.modeling_qwen import write_remote_code

    out = tmp_path / "out"
    QWenTokenizer.from_pretrained(tiny_chat).save_pretrained(out)
    write_remote_code(out, ("tokenization_qwen.py", "qwen_generation_utils.py"))
    assert "auto_map" in json.loads((out / "tokenizer_config.json").read_text())
    export_qwen2(tiny_chat, out, force=True)
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "fixture, field", [("tiny_bias_everywhere", "no_bias"), ("tiny_rotary_pct_half", "rotary_pct")]
)
def test_refuses_what_qwen2_cannot_express_on_disk(tmp_path, fixture, field):
    with pytest.raises(ValueError, match=field):
        export_qwen2(GOLDEN / fixture, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(no_bias=False), "no_bias"),
        (dict(rotary_pct=0.5), "rotary_pct"),
        (dict(window_attn_sizes=[4, None]), "window_attn_sizes"),
    ],
)
def test_refuses_what_qwen2_cannot_express_in_memory(tmp_path, overrides, field):
    config = qwen.QWenConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
        intermediate_size=64, seq_length=16, fp32=True, **overrides,
    )
    model = qwen.QWenLMHeadModel(config).eval()
    with pytest.raises(ValueError, match=field):
        export_qwen2(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_windows_that_are_all_off_are_plain_attention(tmp_path):
    config = qwen.QWenConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
        intermediate_size=64, seq_length=16, fp32=True, window_attn_sizes=[None, 0],
    )
    ours = qwen.QWenLMHeadModel(config).eval()
    assert_same_function(ours, to_qwen2(ours), vocab=64)


def test_refuses_tensors_without_a_qwen2_counterpart(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    load_ours(GOLDEN / "tiny_default").save_pretrained(src)
    state = load_file(str(src / "model.safetensors"))
    state["transformer.h.0.attn.c_attn.qweight"] = torch.zeros(4, 4, dtype=torch.int32)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="qweight"):
        export_qwen2(src, tmp_path / "out")


# ----------------------------------------------------------------------------- CLI


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "SRC" in text.upper() and "--dtype" in text and "--force" in text and "Qwen2ForCausalLM" in text


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main([str(GOLDEN / "tiny_bias_everywhere"), str(tmp_path / "out")]) == 2
    assert "no_bias" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    src = GOLDEN / "tiny_default"
    proc = run_python(["-m", "qwen.tools.export_qwen2", str(src), str(tmp_path / "out"), "--dtype", "float32"],
                      cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "wrote a Qwen2ForCausalLM checkpoint" in proc.stdout
    assert "not carried over" in proc.stderr
    theirs = Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_same_function(load_ours(src), theirs, vocab=1024)
