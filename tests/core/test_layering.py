import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "refusal_core"


def test_refusal_core_never_imports_dagster():
    modules = sorted(f"refusal_core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "assert 'dagster' not in sys.modules, 'dagster imported'\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
