"""The direction of flow: nothing in the pipeline imports the toy trainers and demo in ``zoo/``, and
what the analyses build on (checkpoints, data, numerics) imports no analysis."""

import ast
from pathlib import Path

import ckpt_analysis

PACKAGE = Path(ckpt_analysis.__file__).parent
ALLOWED = ("zoo", "cli.py")
"""Only ``zoo/`` itself and the CLI, which mounts its commands, may import ``ckpt_analysis.zoo``."""


def _imported_modules(file: Path) -> set[str]:
    """Absolute names of every module ``file`` imports, at top level or inside functions."""
    package = ".".join(("ckpt_analysis", *file.relative_to(PACKAGE).parent.parts))
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return found


def test_nothing_outside_zoo_and_the_cli_imports_zoo() -> None:
    offenders = [
        str(file.relative_to(PACKAGE))
        for file in PACKAGE.rglob("*.py")
        if file.relative_to(PACKAGE).parts[0] not in ALLOWED
        and any(
            m == "ckpt_analysis.zoo" or m.startswith("ckpt_analysis.zoo.") for m in _imported_modules(file)
        )
    ]
    assert offenders == []


def test_the_import_walk_sees_relative_and_function_level_imports() -> None:
    sample = PACKAGE / "analyses" / "covariance.py"
    assert "ckpt_analysis.registry" in _imported_modules(sample)
    relative = PACKAGE / "analyses" / "_walk_probe.py"
    relative.write_text("def f():\n    from ..zoo import demo\n")
    try:
        assert "ckpt_analysis.zoo.demo" in _imported_modules(relative)
    finally:
        relative.unlink()


BELOW_THE_ANALYSES = (
    "attention.py",
    "checkpoints",
    "config.py",
    "corpus.py",
    "curvature.py",
    "data.py",
    "digests.py",
    "directional.py",
    "losses.py",
    "models",
    "sites.py",
    "spectral.py",
    "tasks",
    "types.py",
)
"""What the analyses build on: checkpoints, data and the numerics; none of it may import an analysis."""


def test_what_the_analyses_build_on_imports_no_analysis() -> None:
    offenders = [
        str(file.relative_to(PACKAGE))
        for file in PACKAGE.rglob("*.py")
        if file.relative_to(PACKAGE).parts[0] in BELOW_THE_ANALYSES
        and any(m.startswith("ckpt_analysis.analyses") for m in _imported_modules(file))
    ]
    assert offenders == []
