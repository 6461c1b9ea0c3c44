"""Public routing kernels for the benchmark's comparator columns (issue 20 item 8).

The kernels are pure-Triton modules of published packages, fetched (checksums pinned) by
``scripts/fetch_public_kernels.sh`` into ``<repo>/.bench_public`` (or ``$MOE_EXT_BENCH_PUBLIC``).
Nothing is installed and nothing is copied into the project: at benchmark time the module's
file is extracted from the archive into a temporary directory and imported from there with
``importlib.util.spec_from_file_location``; a module that imports a sibling through its package
(``from transformer_engine.common.triton.permutation import ...``) gets that one name registered
in ``sys.modules`` for the duration of its import only.

``load(device)`` returns, per public kernel, either its loaded modules or a one-line reason why
it is not available ("not fetched", a checksum mismatch, "needs CUDA", an import error).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Archive:
    """A published archive and the pure-Triton module files the benchmark imports from it, in import order:
    (module name to import it as, member path inside the archive)."""
    key: str
    label: str
    file: str
    sha256: str
    members: tuple[tuple[str, str], ...]


MEGABLOCKS = Archive(
    "megablocks", "megablocks 0.10.0 backend/kernels.py (Triton)", "megablocks-0.10.0.tar.gz",
    "956fd9880fa869f7468da125da230733d5f84e10a9f8c2991e5e16523c6fe1e0",
    (("kernels", "megablocks-0.10.0/megablocks/backend/kernels.py"),))

TRANSFORMER_ENGINE = Archive(
    "te", "transformer_engine 2.20.2 pytorch/triton/permutation.py (Triton)",
    "transformer_engine-2.20.2-py3-none-any.whl",
    "7dcfad943a1a55b2612db9a0e43697fe98c70f4c42ec391ba3a0f872f6ce2094",
    (("transformer_engine.common.triton.permutation", "transformer_engine/common/triton/permutation.py"),
     ("permutation", "transformer_engine/pytorch/triton/permutation.py")))

ARCHIVES = (MEGABLOCKS, TRANSFORMER_ENGINE)


@dataclass
class Public:
    """One public kernel: its modules by name when available, else why not."""
    archive: Archive
    modules: dict[str, ModuleType] = field(default_factory=dict)
    reason: str = ""

    @property
    def available(self) -> bool:
        return not self.reason


def public_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MOE_EXT_BENCH_PUBLIC") or ROOT / ".bench_public")


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_member(path: pathlib.Path, member: str) -> bytes:
    if path.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as archive:
            return archive.read(member)
    with tarfile.open(path) as archive:
        handle = archive.extractfile(member)
        if handle is None:
            raise KeyError(member)
        return handle.read()


_TEMP_DIRS: list[str] = []


def _cleanup() -> None:
    for directory in _TEMP_DIRS:
        shutil.rmtree(directory, ignore_errors=True)


atexit.register(_cleanup)


def load_archive(archive: Archive, directory: pathlib.Path | None = None) -> Public:
    """Check the archive's checksum, extract its members into a temporary directory and import them.

    A member named with dots (``a.b.c``) is registered in ``sys.modules`` under that name while the
    following members are imported (their ``from a.b.c import ...`` then resolves to it), and removed
    afterwards; the others get a private name. Never raises: failures become ``Public.reason``.
    """
    path = (directory or public_dir()) / archive.file
    if not path.is_file():
        return Public(archive, reason=f"not fetched: no {path} (bash scripts/fetch_public_kernels.sh)")
    checksum = _sha256(path)
    if checksum != archive.sha256:
        return Public(archive, reason=f"checksum mismatch: {path} is {checksum[:12]}..., "
                                      f"expected {archive.sha256[:12]}...")
    temp = tempfile.mkdtemp(prefix=f"moe_ext_public_{archive.key}_")
    _TEMP_DIRS.append(temp)
    modules: dict[str, ModuleType] = {}
    registered: list[str] = []
    try:
        for name, member in archive.members:
            source = pathlib.Path(temp) / member
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(_read_member(path, member))
            module_name = name if "." in name else f"_moe_ext_public_{archive.key}_{name}"
            spec = importlib.util.spec_from_file_location(module_name, source)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # Triton's JIT and dataclasses look modules up by name
            registered.append(module_name)
            spec.loader.exec_module(module)
            modules[name] = module
    except Exception as error:  # noqa: BLE001 - any import failure makes the column "n/a (why)"
        return Public(archive, reason=f"import failed: {type(error).__name__}: {str(error).splitlines()[0]}")
    finally:
        for module_name in registered:
            if "." in module_name:  # a package-qualified name, needed only while its importers load
                sys.modules.pop(module_name, None)
    return Public(archive, modules)


def load(device: str) -> dict[str, Public]:
    """Every public kernel by key ('megablocks', 'te'): loaded, or the reason it is not."""
    result = {}
    for archive in ARCHIVES:
        if not (directory := public_dir()).joinpath(archive.file).is_file():
            result[archive.key] = Public(archive, reason=f"not fetched: no {directory / archive.file} "
                                                         "(bash scripts/fetch_public_kernels.sh)")
        elif device != "cuda":
            result[archive.key] = Public(archive, reason="needs CUDA (Triton kernels)")
        else:
            result[archive.key] = load_archive(archive)
    return result
