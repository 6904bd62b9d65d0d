"""The sub-packages of sglang.srt form layers: no two of them import each other, even indirectly.

Every import in every module counts, function-level and `if TYPE_CHECKING:` ones included, since
each is a dependency a reader has to follow. A lower layer that needs something from a higher
one takes a protocol, or the few fields it reads, defined in its own package.

The one exception is SGLang's convention that layers and models import
`model_executor.forward_batch` (the per-forward metadata); imports of exactly that module make
no edge. What forward_batch itself imports does.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRT_ROOT = Path(__file__).resolve().parents[2] / "python" / "sglang" / "srt"
SRT_PACKAGE = "sglang.srt"
# Layers and models import this by SGLang's convention; importing it makes no edge.
EXEMPT_MODULES = frozenset({"sglang.srt.model_executor.forward_batch"})


@dataclass(frozen=True)
class ImportSite:
    """One import of a sglang.srt module: where it is written and what it names."""

    path: str  # relative to the repository root
    line: int
    source: str  # the module doing the import
    target: str  # the sglang.srt module imported

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRT_ROOT.parents[1]).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def node_of(module: str) -> str:
    """The sub-package (or top-level module, e.g. server_args) of sglang.srt holding `module`;
    "srt" for the package's own __init__."""
    rest = module[len(SRT_PACKAGE) :].lstrip(".")
    return rest.split(".")[0] if rest else "srt"


def is_srt_module(module: str) -> bool:
    return module == SRT_PACKAGE or module.startswith(SRT_PACKAGE + ".")


def resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by `from X import ...`, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(code: str, module: str, is_package: bool, known_modules: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every sglang.srt import in `code` (the text of `module`), at any depth.
    `from pkg import name` counts as importing pkg.name when that is a module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(module, is_package, node)
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            named = [m for m in submodules if m in known_modules]
            found += [(node.lineno, m) for m in named]
            if len(named) < len(submodules):  # some names are attributes of `base` itself
                found.append((node.lineno, base))
    return sorted((line, target) for line, target in found if is_srt_module(target))


def collect_import_sites() -> list[ImportSite]:
    paths = sorted(SRT_ROOT.rglob("*.py"))
    known_modules = {module_name(p) for p in paths}
    repo_root = SRT_ROOT.parents[2]
    sites = []
    for path in paths:
        source = module_name(path)
        is_package = path.name == "__init__.py"
        for line, target in imported_modules(path.read_text(), source, is_package, known_modules):
            sites.append(ImportSite(str(path.relative_to(repo_root)), line, source, target))
    return sites


def package_graph(sites: list[ImportSite]) -> dict[tuple[str, str], list[ImportSite]]:
    """(importing node, imported node) -> the imports behind that edge."""
    edges: dict[tuple[str, str], list[ImportSite]] = {}
    for site in sites:
        if site.target in EXEMPT_MODULES:
            continue
        edge = (node_of(site.source), node_of(site.target))
        if edge[0] != edge[1]:
            edges.setdefault(edge, []).append(site)
    return edges


def simple_cycles(edges: dict[tuple[str, str], list[ImportSite]]) -> list[list[str]]:
    """Every elementary cycle, as [a, b, ..., a] starting at its smallest node, shortest first.
    Exhaustive search; the graph has a dozen nodes."""
    successors: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        successors.setdefault(a, []).append(b)
    cycles: list[list[str]] = []

    def extend(path: list[str]) -> None:
        for b in successors.get(path[-1], []):
            if b == path[0]:
                cycles.append(path + [b])
            elif b > path[0] and b not in path:
                extend(path + [b])

    for start in sorted(successors):
        extend([start])
    return sorted(cycles, key=lambda cycle: (len(cycle), cycle))


def describe_cycles(
    edges: dict[tuple[str, str], list[ImportSite]], max_cycles: int = 20, max_sites_per_edge: int = 3
) -> str:
    """The edges that close the most cycles (removing one breaks all the cycles through it), then
    each cycle with the imports behind each of its edges."""
    cycles = simple_cycles(edges)
    if not cycles:
        return ""
    through: dict[tuple[str, str], int] = {}
    for cycle in cycles:
        for edge in zip(cycle, cycle[1:]):
            through[edge] = through.get(edge, 0) + 1
    ranked = sorted(through.items(), key=lambda item: (-item[1], item[0]))
    lines = [f"{len(cycles)} cycle(s); edges by the number of cycles through them:"]
    lines += [f"  {a} -> {b}: {n}" for (a, b), n in ranked]
    for cycle in cycles[:max_cycles]:
        lines.append(f"cycle: {' -> '.join(cycle)}")
        for a, b in zip(cycle, cycle[1:]):
            sites = edges[(a, b)]
            lines.append(f"  {a} -> {b}, {len(sites)} import(s):")
            lines += [f"    {site}" for site in sites[:max_sites_per_edge]]
            if len(sites) > max_sites_per_edge:
                lines.append(f"    ... and {len(sites) - max_sites_per_edge} more")
    if len(cycles) > max_cycles:
        lines.append(f"... and {len(cycles) - max_cycles} more cycle(s)")
    return "\n".join(lines)


def test_srt_sub_packages_have_no_import_cycle() -> None:
    edges = package_graph(collect_import_sites())
    cycles = describe_cycles(edges)
    assert not cycles, (
        "sub-packages of sglang.srt import each other in a cycle. Make the lower package take a "
        "protocol (or the few fields it reads) defined in its own package, or move the shared "
        "code down, instead of importing the package above:\n" + cycles
    )


def test_the_import_reader_sees_function_level_and_type_checking_imports() -> None:
    """Guards the reader itself: an import it missed would hide a cycle."""
    code = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from sglang.srt.managers.schedule_batch import Req\n"
        "def f():\n"
        "    import sglang.srt.layers.sampler\n"
        "    from sglang.srt import utils\n"
        "    from .radix_cache import RadixCache\n"
        "    from sglang.srt.model_executor import forward_batch\n"
        "    from ..configs.model_config import ModelConfig\n"
    )
    module = "sglang.srt.mem_cache.kv_cache_manager"
    known = {module_name(p) for p in SRT_ROOT.rglob("*.py")}
    found = imported_modules(code, module, False, known)
    assert found == [
        (3, "sglang.srt.managers.schedule_batch"),
        (5, "sglang.srt.layers.sampler"),
        (6, "sglang.srt.utils"),
        (7, "sglang.srt.mem_cache.radix_cache"),
        (8, "sglang.srt.model_executor.forward_batch"),
        (9, "sglang.srt.configs.model_config"),
    ]
    sites = [ImportSite("x.py", line, module, target) for line, target in found]
    assert set(package_graph(sites)) == {
        ("mem_cache", "managers"),
        ("mem_cache", "layers"),
        ("mem_cache", "utils"),
        ("mem_cache", "configs"),
    }


def test_a_cycle_is_reported_with_its_import_sites() -> None:
    sites = [
        ImportSite("a.py", 3, "sglang.srt.mem_cache.kv_cache_manager", "sglang.srt.managers.schedule_batch"),
        ImportSite("b.py", 7, "sglang.srt.managers.schedule_batch", "sglang.srt.mem_cache.radix_cache"),
        ImportSite("c.py", 9, "sglang.srt.layers.linear", "sglang.srt.model_executor.forward_batch"),
        ImportSite("d.py", 1, "sglang.srt.model_executor.model_runner", "sglang.srt.layers.linear"),
    ]
    report = describe_cycles(package_graph(sites))
    assert report.splitlines()[:4] == [
        "1 cycle(s); edges by the number of cycles through them:",
        "  managers -> mem_cache: 1",
        "  mem_cache -> managers: 1",
        "cycle: managers -> mem_cache -> managers",
    ]
    assert "a.py:3: imports sglang.srt.managers.schedule_batch" in report
    assert "b.py:7:" in report
    assert "layers" not in report  # the forward_batch import is exempt


def test_req_has_every_member_of_the_protocol_kv_cache_manager_takes() -> None:
    """KVCacheReq stands in for Req so that mem_cache need not import managers; it must not drift."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.kv_cache_manager import KVCacheReq
    from sglang.srt.sampling.sampling_params import SamplingParams

    members = set(KVCacheReq.__annotations__) | {n for n in vars(KVCacheReq) if not n.startswith("_")}
    assert {"fill_ids", "max_prefix_len", "kv_len", "last_node"} <= members
    req = Req("r", [1, 2, 3], SamplingParams(), seed=0)
    assert [m for m in sorted(members) if not hasattr(req, m)] == []


def test_the_http_process_loads_no_model_code() -> None:
    """The HTTP server starts its backend processes by entry-point name, so importing it (what
    the HTTP process does) loads neither the scheduler nor the model or TKNP runners."""
    import subprocess
    import sys

    code = (
        "import sys, sglang.srt.entrypoints.http_server; "
        "print(' '.join(m for m in sys.modules if m.startswith('sglang.srt')))"
    )
    loaded = set(
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    )
    assert "sglang.srt.entrypoints.subprocesses" in loaded  # the probe really imported the server
    heavy = {
        "sglang.srt.managers.scheduler",
        "sglang.srt.managers.scheduler_process",
        "sglang.srt.model_executor.model_runner",
        "sglang.srt.model_executor.tknp_runner",
        "sglang.srt.models.llama",
    }
    assert not heavy & loaded, sorted(heavy & loaded)
