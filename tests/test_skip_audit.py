"""The skip audit of tests/conftest.py (PK_EXPECTED_SKIPS): a skip the list does not allow,
a skipped module, a skip for another reason than the listed one, and a run in which no test
passed each fail the session; allowed skips do not. Runs pytest in a subprocess on generated
test files with the conftest loaded as a plugin."""
import os
import pathlib
import subprocess
import sys
import textwrap

TESTS = pathlib.Path(__file__).resolve().parent

PROBES = {
    "test_probe_a.py": """
        import pytest

        def test_passes():
            pass

        def test_listed():
            pytest.skip("listed reason")

        def test_listed_other_reason():
            pytest.skip("some other reason")

        def test_unlisted():
            pytest.skip("nobody listed this")

        @pytest.mark.cuda
        def test_gpu():
            pass
    """,
    "test_probe_b.py": """
        import pytest
        pytest.importorskip("a_module_that_does_not_exist_anywhere")

        def test_never_collected():
            pass
    """,
}
RULES = """
    # comment lines and blank lines are ignored
    marker:cuda -- needs an NVIDIA GPU
    *test_probe_a.py::test_listed* -- listed reason
"""


def run(tmp_path, files, rules=RULES, enabled=True):
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    (tmp_path / "expected.txt").write_text(textwrap.dedent(rules))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.pop("PK_EXPECTED_SKIPS", None)
    env.pop("PK_SKIPS_REPORT", None)
    if enabled:
        env["PK_EXPECTED_SKIPS"] = str(tmp_path / "expected.txt")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), "-c", os.devnull, *files], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_unexpected_skips_fail_the_session(tmp_path):
    rc, out = run(tmp_path, PROBES)
    assert rc == 1, out
    summary = out[out.index("unexpected skips"):]
    offenders = sorted(line.split(" -- ")[0].strip() for line in summary.splitlines() if " -- " in line)
    assert offenders == ["test_probe_a.py::test_listed_other_reason", "test_probe_a.py::test_unlisted",
                         "test_probe_b.py"], out


def test_allowed_skips_pass(tmp_path):
    files = {"test_probe_a.py": PROBES["test_probe_a.py"].replace('"some other reason"', '"listed reason"')
             .replace('"nobody listed this"', '"listed reason"').replace("def test_unlisted", "def test_listed_too")}
    rc, out = run(tmp_path, files)
    assert rc == 0, out
    assert "unexpected skips" not in out


def test_no_passed_test_fails_the_session(tmp_path):
    files = {"test_probe_c.py": """
        import pytest

        def test_listed():
            pytest.skip("listed reason")
    """}
    rc, out = run(tmp_path, files, rules="test_probe_c.py::* -- listed reason\n")
    assert rc == 1 and "no test passed" in out, out
    rc, out = run(tmp_path, files, enabled=False)  # the audit is off without PK_EXPECTED_SKIPS
    assert rc == 0, out
