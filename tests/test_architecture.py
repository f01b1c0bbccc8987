"""The architecture as code: import-linter contracts in setup.cfg (layers launch -> experiments -> train | eval ->
parallel -> mod | data -> config -> paths -> errors; mod never imports deepspeed; eval and parallel never import
train; data never imports mod). CI fails when an import breaks one."""
import ast
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


def _mod_train_imports(module: str) -> set[str]:
    """The mod_train modules `module` imports anywhere in its source (module level or inside functions)."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mod_train"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mod_train")}
    return out


def test_no_import_circle_between_config_and_paths():
    """issue 18 item 3: config -> paths -> errors, never back (not even inside a function), and each of
    mod_train.errors, mod_train.paths and mod_train.config imports alone in a fresh interpreter."""
    assert _mod_train_imports("mod_train.errors") == set()
    assert _mod_train_imports("mod_train.paths") == {"mod_train.errors"}
    assert "mod_train.config" not in _mod_train_imports("mod_train.paths")
    from mod_train.config import ConfigError, UserError
    from mod_train.errors import ConfigError as E1, UserError as E2
    from mod_train.paths import MissingPathError
    assert (ConfigError, UserError) == (E1, E2) and issubclass(MissingPathError, ConfigError)
    for m in ("mod_train.errors", "mod_train.paths", "mod_train.config"):
        out = subprocess.run([sys.executable, "-c", f"import {m}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, f"import {m}: " + out.stderr
