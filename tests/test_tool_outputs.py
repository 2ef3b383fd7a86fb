"""Where checkpoints are written (qwen/tools/output_dir.py and QWenLMHeadModel.save_pretrained):
never over the source, never into a non-empty directory without --force, nothing half-written,
no stale weight files, never through a symlink into a shared cache, and 2023 code kept as *.py.orig."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen
from qwen.modeling_qwen import REMOTE_CODE_FILES
from qwen.tools.export_qwen2 import export_qwen2
from qwen.tools.export_qwen2 import main as export_main
from qwen.tools.tiny_checkpoint import build
from transformers import Qwen2ForCausalLM

GOLDEN = Path(__file__).parent / "fixtures" / "golden_models" / "tiny_default"
REPO_ROOT = Path(__file__).resolve().parent.parent
OLD_CODE = b"# Copyright (c) Alibaba Cloud.\nfrom transformers_stream_generator import init_stream_support\n"
TINY_FILES = {"config.json", "generation_config.json", "model.safetensors", "qwen.tiktoken",
              "tokenizer_config.json", *REMOTE_CODE_FILES}
IDS = torch.tensor([[5, 17, 301, 1023, 42, 7]])


def run_tool(tool, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", f"qwen.tools.{tool}", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_refused(proc, *words):
    """Exit 2 with one `error:` line naming `words`, and no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(word in lines[0] for word in words), lines[0]


def snapshot(directory: Path) -> dict:
    """Every entry under `directory`: link target for symlinks, content digest for files."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        if path.is_symlink():
            entries[key] = ("link", os.readlink(path))
        elif path.is_file():
            entries[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return entries


def no_staging_left(parent: Path) -> bool:
    return not [p for p in parent.rglob(".*") if p.name.endswith(".partial") or p.name.startswith(".qwen-save-")]


def load_ours(path):
    return qwen.QWenLMHeadModel.from_pretrained(path).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def src(tmp_path):
    """A private copy of the golden checkpoint (fp32, vocab 1024, no tokenizer)."""
    return Path(shutil.copytree(GOLDEN, tmp_path / "ckpts" / "Qwen-tiny"))


def stale_checkpoint(directory: Path) -> None:
    """`directory` holding an older sharded checkpoint, a .bin copy, 2023 code and a user's notes."""
    load_ours(GOLDEN).save_pretrained(directory, max_shard_size="100KB")
    torch.save({"x": torch.zeros(2)}, directory / "pytorch_model.bin")
    (directory / "tokenization_qwen.py").write_bytes(OLD_CODE)
    (directory / "notes.txt").write_text("mine")
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1


# ----------------------------------------------------------------------------- export_qwen2: OUT vs SRC


def test_export_onto_its_source_is_refused_and_the_source_survives(src):
    before = snapshot(src)
    assert_refused(run_tool("export_qwen2", src, src), "is the source")
    assert snapshot(src) == before and no_staging_left(src.parent)


@pytest.mark.parametrize("kind", ["symlink to SRC", "parent of SRC"])
def test_export_into_an_alias_or_a_parent_of_its_source_is_refused(src, capsys, kind):
    out = src.parent
    if kind == "symlink to SRC":
        out = src.parent.parent / "alias"
        out.symlink_to(src, target_is_directory=True)
    before = snapshot(src)
    assert export_main([str(src), str(out), "--force"]) == 2
    assert "is the source" in capsys.readouterr().err
    assert snapshot(src) == before


def test_export_into_a_folder_inside_its_source_works(src):
    before = snapshot(src)
    export_qwen2(src, src / "qwen2")
    assert {k: v for k, v in snapshot(src).items() if not k.startswith("qwen2")} == before
    assert type(Qwen2ForCausalLM.from_pretrained(src / "qwen2")) is Qwen2ForCausalLM


# ----------------------------------------------------------------------------- export_qwen2: non-empty OUT


def test_export_into_a_non_empty_directory_needs_force(src, tmp_path):
    out = tmp_path / "out"
    stale_checkpoint(out)
    before = snapshot(out)
    assert_refused(run_tool("export_qwen2", src, out), "not empty", "--force")
    assert snapshot(out) == before

    assert export_main([str(src), str(out), "--force"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "notes.txt" in names
    assert not names & {"model.safetensors.index.json", "pytorch_model.bin"}
    assert not list(out.glob("model-*-of-*.safetensors"))  # the old shards are gone
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    theirs = Qwen2ForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(theirs), logits(load_ours(GOLDEN)), atol=1e-5, rtol=0)
    assert no_staging_left(tmp_path)


def test_forced_export_leaves_2023_code_it_does_not_replace(tmp_path):
    """The export is native (tokenizer.json, no remote code): a stale checkpoint's 2023 code stays
    as it was, and nothing points at it any more."""
    tiny = build(tmp_path / "tiny", chat=True)
    out = tmp_path / "out"
    stale_checkpoint(out)
    export_qwen2(tiny, out, force=True)
    assert (out / "tokenization_qwen.py").read_bytes() == OLD_CODE
    assert not (out / "tokenization_qwen.py.orig").exists()
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "qwen.tiktoken").read_bytes() == (tiny / "qwen.tiktoken").read_bytes()


def test_a_failed_export_leaves_out_as_it_was(src, tmp_path):
    """The source lacks a tensor in its last shard: the first shards convert, then the export fails."""
    sharded = tmp_path / "sharded"
    load_ours(src).save_pretrained(sharded, max_shard_size="100KB")
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last = index["weight_map"].pop("transformer.ln_f.weight")
    state = load_file(str(sharded / last))
    del state["transformer.ln_f.weight"]
    save_file(state, str(sharded / last), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))

    with pytest.raises(ValueError, match="lacks"):
        export_qwen2(sharded, tmp_path / "new")
    assert not (tmp_path / "new").exists()

    out = tmp_path / "out"
    export_qwen2(src, out)
    before = snapshot(out)
    with pytest.raises(ValueError, match="lacks"):
        export_qwen2(sharded, out, force=True)
    assert snapshot(out) == before and no_staging_left(tmp_path)


# ----------------------------------------------------------------------------- tiny_checkpoint


def test_tiny_checkpoint_rewrites_its_own_directory_only_with_force(tmp_path):
    out = tmp_path / "demo_checkpoint"
    build(out, chat=True)
    written = {p.name for p in out.iterdir()}
    assert TINY_FILES <= written
    with pytest.raises(FileExistsError, match="--force"):
        build(out, chat=True)
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        (out / name).write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)

    assert_refused(run_tool("tiny_checkpoint", out, "--chat"), "not empty", "--force")
    assert snapshot(out) == before
    forced = run_tool("tiny_checkpoint", out, "--chat", "--force")
    assert forced.returncode == 0, forced.stderr
    assert {p.name for p in out.iterdir()} == written | {"notes.txt"}
    assert not list(out.glob("*.orig"))  # what it replaced was its own
    assert logits(load_ours(out)).shape == (1, 6, 151936)


def test_tiny_checkpoint_refuses_a_file_as_out(tmp_path, capsys):
    from qwen.tools.tiny_checkpoint import main

    (tmp_path / "file").write_text("x")
    assert main([str(tmp_path / "file"), "--force"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_tools_document_force():
    for tool in ("tiny_checkpoint", "export_qwen2"):
        proc = run_tool(tool, "--help")
        assert proc.returncode == 0 and "--force" in proc.stdout
        assert "write into a non-empty OUT" in " ".join(proc.stdout.split())


# ----------------------------------------------------------------------------- save_pretrained


def test_save_pretrained_into_an_original_checkpoint_keeps_its_code(src):
    for name in REMOTE_CODE_FILES:
        (src / name).write_bytes(OLD_CODE)
    model = load_ours(src)  # saved back where it was loaded from (its weights may be views of the file)
    model.save_pretrained(src)
    package = Path(qwen.__file__).parent
    for name in REMOTE_CODE_FILES:
        assert (src / name).read_bytes() == (package / name).read_bytes()
        assert (src / f"{name}.orig").read_bytes() == OLD_CODE

    # Saving again keeps the originals; an older copy of our own code is not backed up.
    (src / "modeling_qwen.py.orig").unlink()
    (src / "modeling_qwen.py").write_bytes((package / "modeling_qwen.py").read_bytes() + b"# older\n")
    model.save_pretrained(src)
    assert not (src / "modeling_qwen.py.orig").exists()
    assert (src / "configuration_qwen.py.orig").read_bytes() == OLD_CODE
    assert torch.equal(logits(load_ours(src)), logits(load_ours(GOLDEN))) and no_staging_left(src)


def test_save_pretrained_never_writes_through_a_cache_symlink(tmp_path):
    """A Hugging Face cache snapshot: each file a symlink to a shared blob."""
    blobs, snapshot_dir = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot_dir.mkdir(parents=True)
    files = {name: (GOLDEN / name).read_bytes() for name in ("config.json", "generation_config.json",
                                                             "model.safetensors")}
    files["modeling_qwen.py"] = OLD_CODE
    for i, (name, data) in enumerate(files.items()):
        (blobs / f"blob{i}").write_bytes(data)
        (snapshot_dir / name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    blobs_before = snapshot(blobs)

    model = load_ours(GOLDEN)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(snapshot_dir)
    assert snapshot(blobs) == blobs_before
    for name in files:
        assert not (snapshot_dir / name).is_symlink(), name
    assert (snapshot_dir / "modeling_qwen.py.orig").read_bytes() == OLD_CODE
    assert torch.equal(logits(load_ours(snapshot_dir)), logits(model))


def test_save_pretrained_removes_stale_weight_files(tmp_path):
    model = load_ours(GOLDEN)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size="100KB")
    torch.save(model.state_dict(), out / "pytorch_model.bin")  # another format: kept, as transformers does
    model.save_pretrained(out)
    assert not (out / "model.safetensors.index.json").exists() and not list(out.glob("model-*"))
    model.save_pretrained(out, max_shard_size="100KB")
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").is_file()
    assert (out / "pytorch_model.bin").is_file()
    assert torch.equal(logits(load_ours(out)), logits(model)) and no_staging_left(out)
