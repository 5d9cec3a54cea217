"""The package as a researcher installs it: the wheel carries the shipped models and data, its
pytest entry point runs a claims folder made by `python -m harness init` from outside this
checkout, and leaves an unrelated test suite alone."""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness.commands.cli import USAGE_ERROR, main
from harness.judgment.claims import load_registry
from harness.plugin.entry import asks_for_claims
from harness.report.folder import read_claims

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "fixtures")


def _clean_env() -> dict[str, str]:
    """The environment minus what would reach into this checkout or this pytest run."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PYTEST")}


def _run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the sources (a build writes build/ and egg-info
    beside them: not into the checkout, where other runs may be building too)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                  str(source)], source)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("codi_hypotheses-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """A fresh virtual environment with the wheel installed: (its python, its site-packages).
    torch and the other dependencies come from this interpreter's site directories, added after
    the venv's own (as --system-site-packages would, but also where this interpreter is itself
    a venv's, whose packages --system-site-packages would not see): offline and in seconds."""
    root = tmp_path_factory.mktemp("venv")
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(root)], root)
    assert made.returncode == 0, made.stderr
    python = root / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip()
    )
    outer = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (purelib / "_outer_site.pth").write_text(f"import site; list(map(site.addsitedir, {outer!r}))\n")
    # --ignore-installed: an install of this checkout in those directories stays as it is
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed"]
    installed = _run([*install, str(wheel)], root)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return python, purelib


def test_the_wheel_carries_every_file_of_its_packages_and_the_pytest_entry_point(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        declared = z.read(entry_points).decode()
    source = {p.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}  # fmt: skip
    assert source - names == set(), "files of the packages missing from the wheel"
    for shipped in ("fixtures/data/gsm8k/test.jsonl", "fixtures/models/tiny-gpt2/model.safetensors",
                    "fixtures/models/tiny-llama/tokenizer.json"):  # fmt: skip
        assert shipped in names
    assert "[pytest11]\ncodi = harness.plugin.entry" in declared


def test_a_claim_runs_from_a_folder_of_its_own_with_the_installed_package(venv, tmp_path):
    python, site_packages = venv
    made = _run([str(python), "-m", "harness", "init", "my-claims"], tmp_path)
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "my-claims"
    assert "cd my-claims && pytest" in made.stdout

    where = ("import json, harness, fixtures, harness.data.problems as d; "
             "print(json.dumps({'harness': harness.__file__, 'fixtures': fixtures.__file__, "
             " 'gsm8k': str(d.GSM8K_PATH), 'work': str(d.WORK_ROOT)}))")  # fmt: skip
    paths = json.loads(_run([str(python), "-c", where], folder).stdout)
    for name in ("harness", "fixtures", "gsm8k"):  # the wheel's, not this checkout's (an editable install)
        assert Path(paths[name]).is_relative_to(site_packages), paths
    assert Path(paths["gsm8k"]).is_file() and Path(paths["work"]) == folder, paths

    run = _run([str(python), "-m", "pytest", "--model", "tiny-gpt2", "--n-problems", "40", "-k", "carry"], folder)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "SUPPORTED    my-thoughts-carry-the-answer" in run.stdout
    (report,) = [p for p in (folder / "reports").iterdir() if p.name != "latest"]
    claims = read_claims(report)
    rows = [(c["id"], c["model"], c["verdict"], c["n"]) for c in claims["claims"]]
    assert rows == [("my-thoughts-carry-the-answer", "tiny-gpt2", "SUPPORTED", 40)]
    assert claims["run"]["registry"] == str(folder / "claims.toml")
    assert (report / "report.html").is_file() and any((folder / ".cache" / "results").iterdir())
    assert not (site_packages / "reports").exists() and not (site_packages / ".cache").exists()


UNRELATED_CONFTEST = """
def pytest_addoption(parser):  # names an ML project's own suite may well use
    parser.addoption("--model", default="mine")
    parser.addoption("--device", default="cpu")
"""

UNRELATED_TEST = """
import gc
import sys

def test_alone(pytestconfig):
    assert pytestconfig.getoption("model") == "mine"
    assert "harness.plugin.suite" not in sys.modules and gc.get_freeze_count() == 0
"""


def test_the_entry_point_leaves_an_unrelated_suite_alone(venv, tmp_path):
    python, _ = venv
    (tmp_path / "conftest.py").write_text(UNRELATED_CONFTEST)
    (tmp_path / "test_unrelated.py").write_text(UNRELATED_TEST)
    run = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout and "CODI claims" not in run.stdout
    assert not (tmp_path / "reports").exists() and not (tmp_path / ".cache").exists()


def test_a_checkout_keeps_reports_cache_and_registry_in_itself_wherever_it_runs_from(tmp_path):
    where = ("import harness.runtime.cache as c, harness.judgment.claims as r, harness.report.folder as p; "
             "print(c.DEFAULT_DIR, r.REGISTRY, p.REPORTS_DIR)")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", where], cwd=tmp_path, env={**_clean_env(), "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.stdout.split() == [str(ROOT / ".cache" / "results"), str(ROOT / "hypotheses" / "claims.toml"),
                                  str(ROOT / "reports")], run.stderr[-2000:]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "asks"),
    [(["--registry", "c.toml"], True), (["--registry=c.toml"], True), (["-q", "--report-dir", "r"], True),
     (["tests/", "-k", "registry"], False), (["--registry-x"], False), ([], False)],
)  # fmt: skip
def test_the_entry_point_turns_the_plugin_on_for_a_named_registry_or_report_folder(args, asks):
    assert asks_for_claims(args) is asks


def test_init_writes_a_starter_that_validates_and_never_overwrites(tmp_path, capsys):
    folder = tmp_path / "claims"
    assert main(["init", str(folder)]) == 0
    out = capsys.readouterr().out
    assert all(str(folder / name) in out for name in ("claims.toml", "test_claims.py", "pytest.ini"))
    claims = load_registry(folder / "claims.toml")
    assert [c.id for c in claims] == ["my-thoughts-carry-the-answer", "my-top3-heads-causal"]
    assert "codi_registry = claims.toml" in (folder / "pytest.ini").read_text()
    compile((folder / "test_claims.py").read_text(), "test_claims.py", "exec")

    (folder / "claims.toml").write_text("# mine\n")
    assert main(["init", str(folder)]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "claims.toml exists" in err
    assert (folder / "claims.toml").read_text() == "# mine\n"


def test_codi_registry_turns_the_plugin_on_and_is_read_relative_to_its_file(pytester, monkeypatch):
    assert main(["init", str(pytester.path)]) == 0
    monkeypatch.chdir(pytester.mkdir("sub"))  # the registry is the ini file's neighbour, not the working directory's
    (pytester.path / "test_claims.py").rename(pytester.path / "test_starter.py")  # tests/test_claims.py is imported
    result = pytester.runpytest_inprocess("-p", "harness.plugin.suite", "--list-claims", str(pytester.path))
    assert result.ret == 0, result.outlines[-10:] + result.errlines[-10:]
    assert f"2 claims in {pytester.path / 'claims.toml'}" in result.outlines
    assert sum("test_starter.py" not in line and "  phase 1  " in line for line in result.outlines) == 2


def test_a_project_using_this_checkout_keeps_its_report_and_cache_in_itself(pytester):
    """With this checkout installed editable (harness importable from here), a researcher's
    folder that sets codi_registry gets reports/ and .cache/results/ in that folder, not in the
    checkout (they went to the checkout's reports/)."""
    assert main(["init", str(pytester.path)]) == 0
    (pytester.path / "test_claims.py").rename(pytester.path / "test_starter.py")  # tests/test_claims.py is imported
    before = set((ROOT / "reports").glob("*")) if (ROOT / "reports").exists() else set()
    args = ("-p", "harness.plugin.suite", "--model", "tiny-gpt2", "--n-problems", "12", "-k", "thoughts-carry")
    result = pytester.runpytest_inprocess(*args)
    assert result.ret in (0, 1), result.outlines[-10:]
    (folder,) = [d for d in (pytester.path / "reports").iterdir() if d.is_dir() and not d.is_symlink()]
    assert [r["id"] for r in read_claims(folder)["claims"]] == ["my-thoughts-carry-the-answer"]
    assert any((pytester.path / ".cache" / "results").iterdir())
    after = set((ROOT / "reports").glob("*")) if (ROOT / "reports").exists() else set()
    assert after == before, "nothing written to the checkout's reports/"


def test_init_refuses_a_folder_whose_pytest_settings_a_new_pytest_ini_would_replace(tmp_path, capsys):
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\naddopts = '-q'\n")
    assert main(["init", str(tmp_path)]) == USAGE_ERROR
    assert "pyproject.toml may hold pytest settings" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pyproject.toml"], "nothing written"
