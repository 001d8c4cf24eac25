"""The dependency rule of docs/architecture.md, read off every module's imports: nothing imports
upward or in a cycle, and the pure parts stay free of torch and Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROLES = ("prefill_worker", "decode_worker", "router")
BENCH_ROOMS = ("serve", "sweep", "plan", "profile", "micro", "quality")
# room -> rooms it may import (one way: serve <- sweep <- plan <- profile; micro alone)
ROOM_DEPS = {
    "serve": set(),
    "sweep": {"serve"},
    "plan": {"serve", "sweep"},
    "profile": {"serve", "sweep", "plan"},
    "micro": set(),
    "quality": {"serve"},
}


def modules() -> list[tuple[str, Path]]:
    out = []
    for top in ("engine", "kv_transfer", *ROLES, "cluster", "bench"):
        for path in sorted((REPO / top).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out.append((".".join(p for p in parts if p != "__init__"), path))
    return out


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """pdserve.* (without the prefix) and third-party names the module imports."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m.removeprefix("pdserve.") for m in found}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def allowed(module: str, target: str) -> bool:
    top, other = module.split(".")[0], target.split(".")[0]
    if other not in ("engine", "kv_transfer", *ROLES, "cluster", "bench"):
        return True  # a third-party package
    if top in ("engine", "kv_transfer"):
        return other in ("engine", "kv_transfer")
    if top in ROLES:
        return other in ("engine", "kv_transfer", top)
    if top == "cluster" and not _in(module, "cluster.cli"):
        return other != "bench" and not _in(target, "cluster.cli")
    if top == "bench":
        if _in(target, "cluster.cli"):
            return False
        room, dep = _room(module), _room(target)
        return room is None or dep is None or dep == room or dep in ROOM_DEPS[room]
    return True


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "bench" and len(parts) > 2 and parts[1] in BENCH_ROOMS else None


@pytest.mark.parametrize(("module", "path"), modules(), ids=lambda x: str(x))
def test_imports_follow_the_dependency_rule(module: str, path: Path) -> None:
    wrong = sorted(t for t in imports(path) if not allowed(module, t))
    assert not wrong, f"{module} imports {wrong} against the rule in docs/architecture.md"


PURE = (
    "router",
    "decode_worker.engine",
    "decode_worker.request_table",
    "decode_worker.step",
    "decode_worker.scheduler",
    "decode_worker.scheduler_integrity",
    "decode_worker.step_inputs",
    "decode_worker.prefill_queue",
    "engine.block_manager",
    "engine.block_audit",
    "engine.deploy_config",
    "engine.request",
    "engine.sampling_types",
    "cluster.config",
)


@pytest.mark.parametrize("prefix", PURE)
def test_pure_parts_import_neither_torch_nor_ray(prefix: str) -> None:
    for module, path in modules():
        if _in(module, prefix):
            heavy = {
                m for m in imports(path, top_level_only=True) if m.split(".")[0] in ("torch", "ray")
            }
            assert not heavy, f"{module} imports {sorted(heavy)} at module level"
