"""The architecture as code: import-linter contracts in setup.cfg (layers launch -> experiments -> train | eval ->
parallel -> mod | data -> config; mod never imports deepspeed; eval and parallel never import train; data never
imports mod). CI fails when an import breaks one."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is not installed (requirements.txt pins it)"
    out = subprocess.run([exe, "--config", str(ROOT / "setup.cfg")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 kept, 0 broken" in out.stdout, out.stdout
