"""tests/assignments.py: a hand-out fails its marker's tests and leaves the assignments it does not feed passing."""
import ast
import functools
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import assignments

ROOT = Path(__file__).resolve().parents[1]


def readme_table() -> dict[str, tuple[str, set[str]]]:
    """{marker: (its module, the modules it needs correct as well)} from README's "Course assignments"."""
    section = (ROOT / "README.md").read_text().split("## Course assignments")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        if graded := re.search(r"python -m pytest -m (\w+)", line):
            cells = line.split("|")
            module = re.search(r"`(\w+)\.py`", cells[1]).group(1)
            rows[graded.group(1)] = module, set(re.findall(r"`(\w+)\.py`", cells[3]))
    return rows


TABLE = readme_table()
# tables is no assignment, but the README's sentence above the table says it needs none: a bystander too.
BYSTANDERS = {**TABLE, "tables": ("evaluate", set())}
# Check 3 runs one bystander per copy: all of them would run the suite about six times over (minutes).
# Each of rpe, mmd, ast, losses, metrics and tables runs once, in a copy it must not depend on;
# sim and data, the slowest, are left out.
BYSTANDER_RUN = {"rpe": "mmd", "mmd": "rpe", "ast": "losses", "sim": "ast", "losses": "tables",
                 "metrics": "mmd", "data": "metrics"}


def pytest_in(folder: Path, expr: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYPOTHESIS_PROFILE="ci")  # derandomized and 40 examples: cheap and repeatable
    return subprocess.run([sys.executable, "-m", "pytest", "-m", expr, "-q", "-p", "no:cacheprovider", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def is_stub(node: ast.FunctionDef) -> bool:
    code = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return len(code) == 1 and ast.unparse(code[0]).startswith("raise NotImplementedError")


@pytest.mark.cli
def test_stub_keeps_decorators_signature_docstring_and_names_the_equations():
    source = ('LIMIT = 3\n\n\nclass A:\n    @staticmethod\n    def f(x: int,\n          y: int = LIMIT) -> int:\n'
              '        """Doc of f, Eq. (1)."""\n        # why\n        z = x + y  # Eq. (5)\n'
              '        return z  # Eqs. (6)-(8)\n\n    def g(self):\n        return 1\n\n\n'
              'def h(x):\n    # the helper\n    def inner():\n        return x\n    return inner()\n')
    out = assignments.stub_source(source, ["A.f", "h"])
    assert out == ('LIMIT = 3\n\n\nclass A:\n    @staticmethod\n    def f(x: int,\n          y: int = LIMIT) -> int:\n'
                   '        """Doc of f, Eq. (1)."""\n'
                   '        raise NotImplementedError("Eqs. (5)-(8): implement A.f")\n\n'
                   '    def g(self):\n        return 1\n\n\n'
                   'def h(x):\n    raise NotImplementedError("implement h")\n')
    assert assignments.equations("no body refs, (Eq. 17) and Eqs. (3) and (9)") == "Eqs. (3), (9), (17)"
    with pytest.raises(LookupError, match="A.missing"):
        assignments.stub_source(source, ["A.missing"])


@pytest.mark.cli
def test_table_of_stubs_matches_the_readme_and_names_real_functions():
    assert set(TABLE) == set(assignments.STUBS)
    for marker, (module, qualnames) in assignments.STUBS.items():
        assert TABLE[marker][0] == module, marker
        for q in qualnames:  # in the repository: importable, and a real body (check 2, the cheap half)
            assert callable(functools.reduce(getattr, q.split("."), importlib.import_module(module))), q
            assert not is_stub(assignments._find(ast.parse((ROOT / f"{module}.py").read_text()), q)), q


@pytest.mark.cli
def test_unknown_marker_and_a_non_empty_out_folder_are_refused_in_one_line(tmp_path, capsys):
    assert assignments.main(["nope", "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope'" in err and "rpe, mmd" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert assignments.main(["mmd", "--out", str(tmp_path / "full")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "full" / "mmd.py").exists()


@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.parametrize("marker", sorted(TABLE))
def test_hand_out_fails_its_marker_and_leaves_a_bystander_passing(marker, tmp_path):
    module, qualnames = assignments.STUBS[marker]
    bystander = BYSTANDER_RUN[marker]
    assert module not in {BYSTANDERS[bystander][0], *BYSTANDERS[bystander][1]}, f"{bystander} needs {module}.py"
    out = tmp_path / "hand-out"
    made = subprocess.run([sys.executable, "tests/assignments.py", marker, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    tree = ast.parse((out / f"{module}.py").read_text())
    assert all(is_stub(assignments._find(tree, q)) for q in qualnames)

    # Checks 1 and 3 in one run, as each run spends seconds importing torch and collecting: the grading
    # command's selection plus the bystander's, every test file collected, the bystander's files first.
    # So with -x the bystander's tests all pass before the first of the marker's fails, on a stub.
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    first = [f for f in files if re.search(rf"pytest\.mark\.{bystander}\b", (ROOT / f).read_text())]
    run = pytest_in(out, f"{marker} or {bystander}", "-x", *first, *(f for f in files if f not in first))
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+?)::.*$", run.stdout, re.M)
    assert run.returncode == 1 and len(failed) == 1 and " passed" in run.stdout, run.stdout[-3000:]
    assert failed[0] not in first and "NotImplementedError" in run.stdout, run.stdout[-3000:]
