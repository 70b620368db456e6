"""House rules that keep the layout honest: import direction, topic strings, light nodes."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "topics", "broker", "planner", "node", "hub", "models", "linguamq", "gateway", "tools")
# What each package may import of ours (schemas <- topics <- roles <- the client API <- tools).
# `linguamq` is the top-level package (repository folder linguamq/): version and client API.
ALLOWED = {
    "schemas": set(),
    "topics": {"schemas"},
    "broker": {"topics", "schemas"},
    "planner": {"topics", "schemas"},
    "node": {"topics", "schemas"},
    "hub": {"topics", "schemas"},
    "models": {"topics", "schemas"},
    "linguamq": {"topics", "schemas"},
    "gateway": {"topics", "schemas", "linguamq"},  # the HTTP gateway is a client of the cluster
    "tools": set(PACKAGES),
}
ENTRY_POINTS = {ROOT / "linguamq" / "__main__.py"}  # `python -m linguamq` runs the command (tools)
TOOLS_TOP_LEVEL_MAX = 12  # more, and tools/ needs another subpackage
# Never on a phone: a node runs on numpy, onnxruntime, paho-mqtt and structlog.
HEAVY = {"torch", "pyomo", "amqtt", "transformers", "onnx", "safetensors"}
# Optional on a device: imported only once found installed, and the role works without it
# (the node tests in .venv-node run without onnx: its layers then run one call each).
OPTIONAL_HEAVY = {("node/merge.py", "onnx")}
NODE_VENV_PYTHON = ROOT / ".venv-node" / "bin" / "python"


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (function bodies included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: use absolute imports (linguamq.x), not relative ones"
            found.add(node.module or "")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_dependency_direction(package: str) -> None:
    offenders = []
    for path in python_files(package):
        if path in ENTRY_POINTS:
            continue
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] in PACKAGES and parts[0] != "linguamq":
                offenders.append(f"{path.relative_to(ROOT)}: bare `import {module}`, use linguamq.{module}")
            elif parts[0] == "linguamq" and len(parts) > 1:
                target = parts[1] if parts[1] in PACKAGES else "linguamq"  # linguamq.client: the top package
                if target != package and target not in ALLOWED[package]:
                    offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("package", ["node", "hub", "gateway"])
def test_devices_roles_never_import_heavy_dependencies(package: str) -> None:
    offenders = [f"{p.relative_to(ROOT)} imports {m}" for p in python_files(package)
                 for m in imported_modules(p) if m.split(".")[0] in HEAVY
                 and (str(p.relative_to(ROOT)), m.split(".")[0]) not in OPTIONAL_HEAVY]
    assert not offenders, "\n".join(offenders)


def test_tools_top_level_stays_small() -> None:
    """tools/ holds commands, benches, chaos cases...: each kind in a subpackage of its own."""
    modules = sorted(p.name for p in (ROOT / "tools").glob("*.py"))
    assert len(modules) <= TOOLS_TOP_LEVEL_MAX, modules


def test_only_topics_builds_topic_strings() -> None:
    literal = re.compile(r"""(?:[fbr]?["'])lmq/""")
    allowed = {ROOT / "topics", ROOT / "tests" / "topics"}
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts) or "build" in path.parts:
            continue
        if any(path.is_relative_to(a) for a in allowed):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if literal.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, "build topics with linguamq.topics:\n" + "\n".join(offenders)


def test_node_runs_in_an_environment_with_only_the_node_extra() -> None:
    assert NODE_VENV_PYTHON.exists(), "run `make setup`: it builds .venv-node with only the `node` extra"
    script = f"""
import importlib, json, pkgutil, sys
import linguamq.node
modules = [m.name for m in pkgutil.walk_packages(linguamq.node.__path__, "linguamq.node.")]
for name in modules:
    importlib.import_module(name)
heavy = {sorted(HEAVY)!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
installed = [name for name in heavy if importlib.util.find_spec(name) is not None]
print(json.dumps({{"modules": modules, "loaded": loaded, "installed": installed}}))
"""
    out = subprocess.run([str(NODE_VENV_PYTHON), "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["modules"], "linguamq.node has no modules to import"
    assert report["loaded"] == [], f"importing the node loaded {report['loaded']}"
    assert report["installed"] == [], f"the node-only environment should not even have {report['installed']}"


@pytest.mark.parametrize("argv", [["--help"], ["node", "--help"], ["generate", "--help"], ["sub", "--help"]])
def test_node_commands_run_in_the_node_only_environment(argv: list[str]) -> None:
    assert NODE_VENV_PYTHON.exists(), "run `make setup`: it builds .venv-node with only the `node` extra"
    out = subprocess.run([str(NODE_VENV_PYTHON), "-m", "linguamq.tools.cli", *argv], capture_output=True,
                         text=True, timeout=120)
    assert "Traceback" not in out.stderr, out.stderr
    # mosquitto_sub's --help exits 1, as mosquitto's does; argparse's exits 0.
    assert out.returncode == (1 if argv[0] == "sub" else 0), out.stderr
    assert "usage" in (out.stdout + out.stderr).lower()


def test_the_package_is_a_library_and_a_command() -> None:
    """`python -m linguamq` is the `linguamq` command, and both say the package's one version;
    `import linguamq` stays light (a phone imports it) and the package is marked typed."""
    import linguamq

    for argv in ([sys.executable, "-m", "linguamq", "--version"], [str(Path(sys.executable).parent / "linguamq"),
                                                                   "--version"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert (out.returncode, out.stdout.strip()) == (0, f"linguamq {linguamq.__version__}"), out.stderr
    assert importlib.metadata.version("linguamq") == linguamq.__version__
    light = subprocess.run([sys.executable, "-c", "import sys, linguamq; print(sorted(m for m in sys.modules "
                            "if m.split('.')[0] in ('paho', 'numpy', 'linguamq') and m != 'linguamq'))"],
                           capture_output=True, text=True, timeout=60)
    assert light.stdout.strip() == "[]", light.stdout + light.stderr
    assert (Path(linguamq.__file__).parent / "py.typed").exists()
