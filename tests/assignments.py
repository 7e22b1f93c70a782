"""Make the starting files of a course assignment: the project with one marker's functions stubbed.

``python tests/assignments.py MARKER --out DIR`` copies the project's files to DIR. There the
functions that MARKER grades keep their decorators, signatures and docstrings; their bodies become
``raise NotImplementedError("Eq. (k): implement NAME")``, naming the equations the removed body
cites (else those of the docstring). Everything else is copied byte for byte.
``python tests/assignments.py --list`` shows each marker's functions and the command that grades them.

Reading ``STUBS``: marker -> (module, the qualnames it stubs); a qualname is ``function`` or
``Class.method``. The list is what the marker's tests exercise, so those tests fail in the copy,
and nothing another assignment needs: ``sim`` leaves rpe.py whole, ``losses`` leaves mmd.py
(README, "Course assignments", third column). Validation helpers (``_check*``) stay as given.
"""
import argparse
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUBS = {
    "rpe": ("rpe", ["_sinusoid", "_encode", "relative_positional_encoding", "absolute_positional_encoding",
                    "interpolated_absolute_positional_encoding"]),
    "mmd": ("mmd", ["gaussian_kernel", "_kernel", "_weighted_mmd", "mmd", "classwise_mmd"]),
    "ast": ("ast_weights", ["annealed_weights", "pseudo_labels"]),
    "sim": ("sign", ["ASPP.forward", "_Block.forward", "SIM.positional_encoding", "SIM.forward",
                     "resize_labels", "SemanticMapping.rows", "SemanticMapping.forward",
                     "Generator.from_table", "SIGN.features", "SIGN.generate", "SIGN.forward"]),
    "losses": ("sign", ["kl_loss", "prediction_loss", "sim_step_loss", "_masked_bce", "discriminator_loss",
                        "generator_loss", "transfer_loss"]),
    "metrics": ("evaluate", ["confusion_matrix", "harmonic", "gzsl_miou", "evaluate_model"]),
    # The seen/unseen split and Shapes' rendering stay: test_evaluate_cli.py builds a Shapes on import,
    # and one error while collecting would stop every marker's run.
    "data": ("data", ["_read_list", "_LabelledFiles.__getitem__", "VOC._pairs", "Context33._pairs",
                      "COCOStuff._pairs", "read_word2vec_binary", "read_fasttext_vec", "class_embedding_table",
                      "load_class_embeddings", "shapes_embeddings"]),
}
# "Eq. (5)", "Eqs. (11)-(14)", "Eqs. (3) and (9)", "(Eq. 17)", "(Eqs. 15-16)"
EQ = re.compile(r"Eqs?\.\s*\(?\d+\)?(?:\s*(?:-|–|,|and)\s*\(?\d+\)?)*")


def equations(text: str) -> str:
    """The equations ``text`` cites, e.g. "Eqs. (11)-(14), (17)"; "" when it cites none."""
    numbers = set()
    for ref in EQ.findall(text):
        numbers.update(map(int, re.findall(r"\d+", ref)))
        for a, b in re.findall(r"(\d+)\)?\s*[-–]\s*\(?(\d+)", ref):  # a range names every equation between
            numbers.update(range(int(a), int(b) + 1))
    runs = []
    for n in sorted(numbers):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    parts = [f"({a})" if a == b else f"({a})-({b})" for a, b in runs]
    return f"{'Eq.' if len(numbers) == 1 else 'Eqs.'} {', '.join(parts)}" if parts else ""


def _find(tree: ast.Module, qualname: str) -> ast.FunctionDef:
    scope = tree.body
    *classes, name = qualname.split(".")
    for cls in classes:
        scope = next((n.body for n in scope if isinstance(n, ast.ClassDef) and n.name == cls), [])
    for node in scope:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise LookupError(f"no function {qualname}")


def stub_source(source: str, qualnames: list[str]) -> str:
    """``source`` with the bodies of ``qualnames`` replaced by ``raise NotImplementedError(...)``."""
    tree, lines = ast.parse(source), source.splitlines(keepends=True)
    spans = []
    for qualname in qualnames:
        node = _find(tree, qualname)
        body = node.body
        has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str)
        first = body[1] if has_doc and len(body) > 1 else body[0]
        if first.lineno == node.lineno or first is not body[0] and first.lineno == body[0].end_lineno:
            raise ValueError(f"{qualname}: its body shares a line with the header; put it on lines of its own")
        start = body[0].end_lineno if has_doc else first.lineno - 1  # 0-based index of the first line to drop
        while not has_doc and start > node.lineno and lines[start - 1].lstrip().startswith("#"):
            start -= 1  # comments that open the body go with it
        if has_doc and len(body) == 1:
            start = node.end_lineno  # a docstring-only body: nothing to drop, the raise goes after it
        removed = "".join(lines[start:node.end_lineno])
        doc = ast.get_docstring(node) or ""
        eq = equations(removed) or equations(doc)
        message = f"{eq}: implement {qualname}" if eq else f"implement {qualname}"
        indent = " " * first.col_offset
        spans.append((start, node.end_lineno, f'{indent}raise NotImplementedError("{message}")\n'))
    for start, end, text in sorted(spans, reverse=True):  # bottom up, so earlier line numbers stay valid
        lines[start:end] = [text]
    return "".join(lines)


def project_files(root: Path) -> list[str]:
    """The files of the project: tracked and not ignored; without git, the same set by pattern."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # a hand-out copy is no git checkout
        out = [str(p.relative_to(root)) for pattern in ("*.py", "tests/*.py", "docs/*", "pytest.ini",
                                                        "requirements.txt", "README.md", "LICENSE")
               for p in root.glob(pattern)]
    return [f for f in out if (root / f).is_file()]


def write_assignment(marker: str, out: Path, root: Path = ROOT) -> None:
    module, qualnames = STUBS[marker]
    for name in project_files(root):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, out / name)
    path = out / f"{module}.py"
    path.write_text(stub_source(path.read_text(), qualnames))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("marker", nargs="?", help=f"one of {', '.join(STUBS)}")
    parser.add_argument("--out", type=Path, help="an empty or new folder for the copy")
    parser.add_argument("--list", action="store_true", help="show what each marker stubs, then exit")
    args = parser.parse_args(argv)
    if args.list:
        for marker, (module, qualnames) in STUBS.items():
            print(f"{marker}: python -m pytest -m {marker}")
            print("".join(f"    {module}:{q}\n" for q in qualnames), end="")
        return 0
    if args.marker is None or args.out is None:
        parser.error("give a MARKER and --out DIR, or --list")
    if args.marker not in STUBS:
        print(f"assignments.py: unknown marker {args.marker!r}; known: {', '.join(STUBS)}", file=sys.stderr)
        return 2
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"assignments.py: {args.out} exists and is not an empty folder; give a new or empty one",
              file=sys.stderr)
        return 2
    write_assignment(args.marker, args.out)
    print(f"{args.out}: {STUBS[args.marker][0]}.py with {len(STUBS[args.marker][1])} functions to implement; "
          f"graded by: python -m pytest -m {args.marker}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
