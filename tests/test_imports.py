"""Every module of the library imports on its own, whatever was imported before it (no import cycles)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import samora

# each module is imported first in a clean slate of samora modules (torch and the rest stay loaded, for speed): a
# cycle between two samora modules only shows when one of them is the first to be imported
_SCRIPT = """
import importlib, sys
failures = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "samora" or m.startswith("samora.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as error:
        failures.append(f"{name}: {type(error).__name__}: {error}")
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def library_modules() -> list[str]:
    root = Path(samora.__file__).parent
    return ["samora"] + [info.name for info in pkgutil.walk_packages([str(root)], prefix="samora.")]


def test_every_library_module_imports_first():
    modules = library_modules()
    assert "samora.adapters.attention" in modules and "samora.engine.embeddings" in modules
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *modules], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"modules that fail when imported first:\n{done.stdout}{done.stderr[-2000:]}"
