"""CPU smoke test of bench/bench_routing.py: the row selection (--only) and the table it prints.

Timings are not checked (a benchmark, not a test of speed); what is checked is which rows are
timed and that every row of the table is well formed.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_routing_under_test", ROOT / "bench" / "bench_routing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def run_main(bench, monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["bench_routing.py", *argv])
    bench.main()
    return capsys.readouterr().out


def table_rows(out: str) -> list[list[str]]:
    """The data rows of the printed markdown table, split into stripped cells."""
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| case ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_only_selects_by_substring(bench):
    names = [name for name, _ in bench.case_list("cpu", True, torch.bfloat16)]
    assert len(names) == len(set(names)), "case names must be unique for --only"
    picked = [name for name in names if bench.selected(name, ["unpermute"])]
    assert picked == ["unpermute T=256 H=512 K=8 EP4", "unpermute bwd T=256 H=512 K=8"]
    # any of several substrings, case-insensitive; nothing given = everything
    assert [n for n in names if bench.selected(n, ["HISTOGRAM", "fp8"])] == [
        "expert_histogram T=256 K=8 E=64", "permute fp8+scales T=256 H=512 K=8 EP4"]
    assert [n for n in names if bench.selected(n, [])] == names
    # the large case list builds nothing until a thunk is called (cheap to list on any machine)
    large = [name for name, _ in bench.case_list("cpu", False, torch.bfloat16)]
    assert "unpermute bwd T=8192 H=7168 K=8 E=256 EP32" in large and len(large) == len(set(large))


def test_only_runs_just_those_rows(bench, monkeypatch, capsys):
    out = run_main(bench, monkeypatch, capsys, "--small", "--only", "histogram,ungroup", "--only", "fp8")
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["ungroup_by_local_expert 4x8 H=512", "expert_histogram T=256 K=8 E=64",
                                        "permute fp8+scales T=256 H=512 K=8 EP4"]
    header = next(line for line in out.splitlines() if line.startswith("| case "))
    assert all(len(row) == len(header.strip("|").split("|")) for row in rows)
    for row in rows:
        float(row[1]), float(row[4].rstrip("*"))  # MB and ours are numbers


def test_only_matches_substrings_inside_names(bench, monkeypatch, capsys):
    """'permute T=256' is inside 'unpermute T=256 ...' too: a substring match, as documented."""
    rows = table_rows(run_main(bench, monkeypatch, capsys, "--small", "--only", "permute T=256"))
    assert [row[0] for row in rows] == ["permute T=256 H=512 K=8 E=64 EP4", "unpermute T=256 H=512 K=8 EP4"]


@pytest.mark.parametrize("argv", [["--only", "no-such-case"], ["--only", ","]])
def test_only_refuses_a_selection_of_nothing(bench, monkeypatch, capsys, argv):
    with pytest.raises(SystemExit) as raised:
        run_main(bench, monkeypatch, capsys, "--small", *argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "--only" in err


# ---------------------------------------------------------------- the public comparator columns (issue 20 item 8)

def test_public_columns_absent_print_not_fetched(bench, monkeypatch, capsys, tmp_path):
    """No fetched archive: the header says 'n/a (not fetched ...)' per public kernel, every row's cells are n/a."""
    monkeypatch.setenv("MOE_EXT_BENCH_PUBLIC", str(tmp_path))
    out = run_main(bench, monkeypatch, capsys, "--small", "--only", "unpermute,histogram")
    for key in ("megablocks", "te"):
        line = next(line for line in out.splitlines() if line.startswith(f"# public {key}:"))
        assert "n/a (not fetched: no " + str(tmp_path) in line, line
    header = next(line for line in out.splitlines() if line.startswith("| case "))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns[-3:] == ["megablocks", "te", "ours/public"]
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["unpermute T=256 H=512 K=8 EP4", "unpermute bwd T=256 H=512 K=8",
                                        "expert_histogram T=256 K=8 E=64"]
    assert all(row[-3:] == ["n/a", "n/a", "n/a"] for row in rows)


def test_public_calls_say_na_when_unavailable_or_not_applicable(bench, monkeypatch, tmp_path):
    public = bench.public_kernels
    monkeypatch.setattr(bench, "PUBLIC", {
        "megablocks": public.Public(public.MEGABLOCKS, reason="not fetched"),
        "te": public.Public(public.TRANSFORMER_ENGINE, modules={"permutation": object()})})
    built = bench.PublicCall(lambda: None, (), lambda out: None)
    calls = bench.public_calls(megablocks=lambda modules: built, te=lambda modules: built)
    assert calls == {"megablocks": "n/a", "te": built}
    assert bench.public_calls(te="no expert filter") == {"megablocks": "n/a", "te": "n/a"}
    # a public output that differs from ours is reported and not timed; an exception is "error"
    assert bench.time_public("te", bench.PublicCall(lambda: torch.ones(2, 3), (),
                                                    lambda out: bench.rows_equal("x", out, torch.zeros(2, 3))),
                             0, "cpu") == "wrong"
    assert bench.time_public("te", bench.PublicCall(lambda: 1 / 0, (), lambda out: None), 0, "cpu") == "error"
    assert bench.time_public("te", "n/a", 0, "cpu") == "n/a"
    assert bench.close("x", torch.tensor([1.0, 2.0]), torch.tensor([1.01, 2.0])) is None
    assert bench.close("x", torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])) is not None


def _write_archive(path, members: dict[str, str]):
    import io
    import tarfile
    import zipfile
    if path.suffix == ".whl":
        with zipfile.ZipFile(path, "w") as archive:
            for name, text in members.items():
                archive.writestr(name, text)
    else:
        with tarfile.open(path, "w:gz") as archive:
            for name, text in members.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("suffix", [".tar.gz", ".whl"])
def test_public_loader_imports_from_the_archive_with_a_package_shim(bench, tmp_path, suffix):
    """The loader reads modules out of an sdist / wheel by checksum, satisfies a package-qualified import of an
    earlier member only while loading, and leaves nothing in sys.modules under the package's name."""
    import hashlib
    public = bench.public_kernels
    path = tmp_path / f"pkg-1.0{suffix}"
    _write_archive(path, {"pkg/common/kernels.py": "def double(x):\n    return 2 * x\n",
                          "pkg/torch/wrap.py": "from fakepkg_i20c.common.kernels import double\n\n"
                                               "def quad(x):\n    return double(double(x))\n"})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    archive = public.Archive("fake", "fake 1.0", path.name, digest,
                             (("fakepkg_i20c.common.kernels", "pkg/common/kernels.py"), ("wrap", "pkg/torch/wrap.py")))
    loaded = public.load_archive(archive, tmp_path)
    assert loaded.available, loaded.reason
    assert loaded.modules["wrap"].quad(3) == 12
    assert "fakepkg_i20c.common.kernels" not in sys.modules
    assert not any(p.name.startswith("pkg") for p in tmp_path.iterdir() if p.is_dir()), "nothing extracted here"

    wrong = public.Archive("fake", "fake 1.0", path.name, "0" * 64, archive.members)
    assert "checksum mismatch" in public.load_archive(wrong, tmp_path).reason
    assert "not fetched" in public.load_archive(archive, tmp_path / "elsewhere").reason
    broken = public.Archive("fake", "fake 1.0", path.name, digest, (("wrap", "pkg/torch/wrap.py"),))
    assert "import failed: ModuleNotFoundError" in public.load_archive(broken, tmp_path).reason


def test_public_archives_pinned_match_the_fetch_script(bench):
    """The benchmark and scripts/fetch_public_kernels.sh pin the same files and checksums."""
    script = (ROOT / "scripts" / "fetch_public_kernels.sh").read_text()
    for archive in bench.public_kernels.ARCHIVES:
        assert f"fetch {archive.file} {archive.sha256}" in script


def test_no_public_leaves_the_columns_out(bench, monkeypatch, capsys):
    out = run_main(bench, monkeypatch, capsys, "--small", "--no-public", "--only", "histogram")
    assert "# public: n/a (--no-public)" in out and "# public megablocks" not in out
    assert [row[-3:] for row in table_rows(out)] == [["n/a", "n/a", "n/a"]]
