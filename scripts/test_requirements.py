"""Print the test requirements (pyproject's `test` extra) that this Python does not satisfy yet.

Used by scripts/run_tests.sh so that the README's test command installs what the
tests need -- and only that: moe_ext itself is never named, so the build that
the README's install command made is not replaced. One requirement per line.

    python3 scripts/test_requirements.py                     # the missing ones
    python3 scripts/test_requirements.py --all               # every one
    python3 scripts/test_requirements.py --without-deps      # the missing ones of [tool.moe_ext]
                                                             # test-without-deps (pip install --no-deps)
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
EXTRA = "test"


def _read_extra(text: str, extra: str) -> list[str]:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        tomllib = None
    if tomllib is not None:
        return list(tomllib.loads(text)["project"]["optional-dependencies"][extra])
    # Python 3.10: the extras are one-line arrays of strings in this file.
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    match = re.search(rf"^{re.escape(extra)}\s*=\s*\[(.*?)\]", section, re.M | re.S)
    if match is None:
        raise SystemExit(f"test_requirements: no '{extra}' extra in {PYPROJECT}")
    return re.findall(r'"([^"]+)"', match.group(1))


def _satisfied(requirement: str) -> bool:
    name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging: presence is all that can be checked (the extra has no pins today)
        return True
    return Requirement(requirement).specifier.contains(installed, prereleases=True)


def _read_without_deps(text: str) -> list[str]:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        tomllib = None
    if tomllib is not None:
        return list(tomllib.loads(text).get("tool", {}).get("moe_ext", {}).get("test-without-deps", []))
    match = re.search(r"^test-without-deps\s*=\s*\[(.*?)\]", text, re.M | re.S)
    return re.findall(r'"([^"]+)"', match.group(1)) if match else []


def main(argv: list[str]) -> int:
    text = PYPROJECT.read_text()
    requirements = _read_without_deps(text) if "--without-deps" in argv else _read_extra(text, EXTRA)
    # Never moe_ext itself: re-installing it would replace what the install step built.
    requirements = [r for r in requirements if not re.match(r"moe[-_]ext\b", r, re.I)]
    wanted = requirements if "--all" in argv else [r for r in requirements if not _satisfied(r)]
    for requirement in wanted:
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
