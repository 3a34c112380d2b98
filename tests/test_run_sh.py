"""Behaviour of run.sh, the entry point: virtualenv creation, the install stamp, locking, pass-through.

Each test copies run.sh into a temporary fake repository whose requirement files hold only comments,
so pip installs nothing and needs no network; creating a virtualenv takes a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUN_SH = Path(__file__).resolve().parents[1] / "run.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or sys.platform == "win32", reason="run.sh needs bash"
)

FAKE_MAIN = """\
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "python": sys.executable}))
if "--help" in sys.argv:
    print("FAKE-IPU-EFFNET-HELP")
sys.exit(3 if "fail" in sys.argv else 0)
"""

CREATING = "creating .venv"
INSTALLING = "ipu_effnet: installing requirements.txt"
UPDATING = "requirements.txt changed"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fake repository: run.sh, comment-only requirement files, a stand-in ipu_effnet package."""
    root = tmp_path / "repo"
    (root / "ipu_effnet").mkdir(parents=True)
    shutil.copy2(RUN_SH, root / "run.sh")
    (root / "requirements.txt").write_text("# nothing to install\n")
    (root / "requirements-test.txt").write_text("# no test extras\n")
    (root / "ipu_effnet" / "__init__.py").write_text("")
    (root / "ipu_effnet" / "__main__.py").write_text(FAKE_MAIN)
    return root


def clean_env(**extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("IPU_EFFNET_") and k not in ("PYTHON", "VIRTUAL_ENV", "PYTEST_ADDOPTS")
    }
    env["PYTHON"] = sys.executable  # the interpreter that creates test virtualenvs
    env.update(extra)
    return env


def run(repo: Path, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(repo / "run.sh"), *args],
        cwd=str(cwd or repo),
        env=clean_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def env_info(proc: subprocess.CompletedProcess) -> dict:
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stamp(repo: Path, name: str = "requirements") -> Path:
    return repo / ".venv" / f".ipu_effnet-{name}.stamp"


@pytest.mark.slow
def test_first_call_creates_venv_writes_stamp_and_second_call_does_not_reinstall(repo: Path):
    first = ok(run(repo, "env"))
    assert CREATING in first.stderr
    assert env_info(first)["python"] == str(repo / ".venv" / "bin" / "python")
    assert stamp(repo).read_text().strip() == sha256(repo / "requirements.txt")
    mtime = stamp(repo).stat().st_mtime_ns

    second = ok(run(repo, "env"))
    assert second.stderr == ""
    assert stamp(repo).stat().st_mtime_ns == mtime
    assert env_info(second)["python"] == env_info(first)["python"]


@pytest.mark.slow
def test_changed_requirements_trigger_one_reinstall(repo: Path):
    ok(run(repo, "env"))
    (repo / "requirements.txt").write_text("# nothing to install\n# still nothing, but changed\n")
    changed = ok(run(repo, "env"))
    assert UPDATING in changed.stderr and CREATING not in changed.stderr
    assert stamp(repo).read_text().strip() == sha256(repo / "requirements.txt")
    assert ok(run(repo, "env")).stderr == ""


@pytest.mark.slow
def test_concurrent_first_calls_install_once_and_all_succeed(repo: Path):
    procs = [
        subprocess.Popen(
            ["bash", str(repo / "run.sh"), "env"],
            cwd=str(repo),
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    for out, err, rc in results:
        proc = ok(subprocess.CompletedProcess([], rc, out, err))
        assert env_info(proc)["python"] == str(repo / ".venv" / "bin" / "python")
    errs = "".join(err for _, err, _ in results)
    assert errs.count(CREATING) == 1
    assert INSTALLING not in errs and UPDATING not in errs
    assert stamp(repo).read_text().strip() == sha256(repo / "requirements.txt")


def test_no_venv_mode_uses_current_interpreter_and_installs_nothing(repo: Path, tmp_path: Path):
    proc = ok(run(repo, "env", IPU_EFFNET_NO_VENV="1", IPU_EFFNET_REQUIREMENTS=str(tmp_path / "missing.txt")))
    assert env_info(proc)["python"] == sys.executable
    assert proc.stderr == ""
    assert not (repo / ".venv").exists() and not (repo / ".venv.lock").exists()


def test_commands_pass_through_to_module_from_repo_root(repo: Path, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["train", "--config", "configs/a b.yaml", "--set", "optim.lr=0.1"]
    proc = ok(run(repo, *args, cwd=elsewhere, IPU_EFFNET_NO_VENV="1"))
    got = json.loads(proc.stdout.splitlines()[0])
    assert got["argv"] == args
    assert got["cwd"] == str(repo.resolve())
    assert run(repo, "train", "fail", IPU_EFFNET_NO_VENV="1").returncode == 3

    helped = ok(run(repo, IPU_EFFNET_NO_VENV="1"))
    assert "usage: ./run.sh" in helped.stdout and "FAKE-IPU-EFFNET-HELP" in helped.stdout
    assert "lint" in helped.stdout and "test [pytest args]" in helped.stdout


def test_test_command_runs_pytest_with_args_and_keeps_its_exit_status(repo: Path):
    (repo / "tests").mkdir()
    (repo / "tests" / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    passed = ok(run(repo, "test", "-q", "-p", "no:cacheprovider", "tests", IPU_EFFNET_NO_VENV="1"))
    assert "1 passed" in passed.stdout
    none = run(repo, "test", "-q", "-p", "no:cacheprovider", "tests", "-k", "nomatch", IPU_EFFNET_NO_VENV="1")
    assert none.returncode == 5  # pytest's "no tests collected" reaches the caller (.ci/run fails on it)


@pytest.mark.slow
def test_test_extras_have_their_own_stamp(repo: Path):
    first = ok(run(repo, "setup", "--test"))
    assert CREATING in first.stderr and "installing requirements-test.txt" in first.stderr
    runtime_mtime = stamp(repo).stat().st_mtime_ns
    assert stamp(repo, "test").read_text().strip() == sha256(repo / "requirements-test.txt")

    (repo / "requirements-test.txt").write_text("# changed test extras\n")
    again = ok(run(repo, "setup", "--test"))
    assert "requirements-test.txt changed" in again.stderr and UPDATING not in again.stderr
    assert stamp(repo).stat().st_mtime_ns == runtime_mtime
    assert stamp(repo, "test").read_text().strip() == sha256(repo / "requirements-test.txt")
    assert ok(run(repo, "setup", "--test")).stderr.startswith("ipu_effnet: ready")


@pytest.mark.slow
def test_failed_install_exits_nonzero_leaves_no_stamp_and_retries(repo: Path, tmp_path: Path):
    bad = tmp_path / "bad.txt"
    bad.write_text("/nonexistent/not_a_package-1.0-py3-none-any.whl\n")
    failed = run(repo, "env", IPU_EFFNET_REQUIREMENTS=str(bad))
    assert failed.returncode != 0
    assert "pip install -r" in failed.stderr and "failed" in failed.stderr
    assert "not_a_package" in failed.stderr  # pip's own output stays visible
    assert not stamp(repo).exists()

    retried = ok(run(repo, "env"))
    assert INSTALLING in retried.stderr and CREATING not in retried.stderr
    assert stamp(repo).exists()


@pytest.mark.slow
def test_venv_path_override_is_relative_to_caller_and_broken_venv_is_recreated(repo: Path, tmp_path: Path):
    venv = tmp_path / "custom-venv"
    ok(run(repo, "env", cwd=tmp_path, IPU_EFFNET_VENV="custom-venv"))
    assert (venv / ".ipu_effnet-requirements.stamp").exists() and (tmp_path / "custom-venv.lock").exists()
    assert not (repo / ".venv").exists()

    (venv / "bin" / "python").unlink()  # e.g. the base interpreter went away
    fixed = ok(run(repo, "env", IPU_EFFNET_VENV=str(venv)))
    assert "recreating" in fixed.stderr
    assert env_info(fixed)["python"] == str(venv / "bin" / "python")


def test_refuses_to_touch_a_directory_that_is_not_a_venv(repo: Path, tmp_path: Path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    proc = run(repo, "env", IPU_EFFNET_VENV=str(precious))
    assert proc.returncode != 0 and "not a virtualenv" in proc.stderr
    assert (precious / "data.txt").read_text() == "keep me"


def fake_wheel(directory: Path) -> Path:
    """A wheel that declares a dependency no index has: installable only with --no-deps."""
    import zipfile

    path = directory / "fakepeer-1.0-py3-none-any.whl"
    files = {
        "fakepeer/__init__.py": "VALUE = 1\n",
        "fakepeer-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: fakepeer\nVersion: 1.0\n"
                                           "Requires-Dist: not-a-real-package-for-ipu-effnet-tests\n",
        "fakepeer-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr("fakepeer-1.0.dist-info/RECORD", "".join(f"{n},,\n" for n in files) +
                    "fakepeer-1.0.dist-info/RECORD,,\n")
    return path


@pytest.mark.slow
def test_test_setup_installs_the_extras_and_the_no_deps_peers(repo: Path, tmp_path: Path):
    (repo / "requirements-extras.txt").write_text("# optional features\n")
    wheel = fake_wheel(tmp_path)
    (repo / "requirements-test-nodeps.txt").write_text(f"{wheel}\n")
    first = ok(run(repo, "setup", "--test", PIP_NO_INDEX="1"))
    assert "installing requirements-extras.txt" in first.stderr
    assert "installing requirements-test-nodeps.txt" in first.stderr
    assert stamp(repo, "extras").read_text().strip() == sha256(repo / "requirements-extras.txt")
    assert stamp(repo, "test-nodeps").read_text().strip() == sha256(repo / "requirements-test-nodeps.txt")
    check = subprocess.run([str(repo / ".venv" / "bin" / "python"), "-c", "import fakepeer; print(fakepeer.VALUE)"],
                           capture_output=True, text=True)
    assert check.stdout.strip() == "1"  # its undeclared dependency was not looked for: --no-deps
    assert ok(run(repo, "setup", "--test")).stderr.startswith("ipu_effnet: ready")  # stamps: no reinstall
    plain = ok(run(repo, "env"))  # other commands install only requirements.txt
    assert "extras" not in plain.stderr
