"""`jaxpatience info` / `tiny`: facts about a checkpoint, and one clear line (exit 2) for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

from test_gguf import write_gguf

from jaxpatience.cli import main


def test_info_describes_an_hf_checkpoint(tiny_checkpoint, capsys):
    path = tiny_checkpoint(tied=True)
    assert main(["info", str(path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["architecture"] == "Qwen2ForCausalLM"
    assert facts["tied_embeddings"] is True
    assert facts["dtype"] == "F32"
    assert facts["chat_template"] == "from checkpoint"
    # parameter count: embedding + per layer (q,k,v with bias, o, 3 MLP, 2 norms) + final norm; tied: no lm_head
    d, f, v, kv = 64, 112, facts["vocab_size"], 2 * 16
    layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * f + 2 * d
    assert facts["parameters"] == v * d + 2 * layer + d


def test_info_describes_a_gguf_file(tiny_checkpoint, tmp_path, capsys):
    path = write_gguf(tiny_checkpoint(), tmp_path / "m.gguf", quantize=False)
    assert main(["info", str(path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["format"] == "gguf" and facts["tied_embeddings"] is False and facts["layers"] == 2


def test_info_bad_paths_give_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.bin").write_bytes(b"junk")
    for bad in [tmp_path / "missing", tmp_path / "empty", tmp_path / "x.bin"]:
        assert main(["info", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jaxpatience: error:") and "\n" not in err and str(bad.name) in err


def test_tiny_then_info_from_the_console_script(tmp_path):
    """What the README's main command does, through the installed entry point."""
    out = tmp_path / "tiny"
    exe = [sys.executable, "-m", "jaxpatience"]  # the same main as the `jaxpatience` console script
    subprocess.run([*exe, "tiny", "--out", str(out)], check=True, capture_output=True)
    again = subprocess.run([*exe, "tiny", "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr  # never overwrites silently
    info = subprocess.run([*exe, "info", str(out)], check=True, capture_output=True, text=True)
    assert "Qwen2ForCausalLM" in info.stdout and "chat_template" in info.stdout
