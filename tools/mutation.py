"""Mutation testing of minilora's core, before a release (not in CI): does the suite catch bugs?

    nice -n 19 python tools/mutation.py                 # every group, one worker (hours)
    nice -n 19 python tools/mutation.py lora optim      # some groups
    nice -n 19 python tools/mutation.py ops --jobs 2    # two workers
    nice -n 19 python tools/mutation.py lora --only minilora/lora/config.py   # one file of a group
    nice -n 19 python tools/mutation.py lora --fresh    # forget the verdicts: after new tests

mutmut (``pip install mutmut``, 3.x) makes many small changes to the code ("mutants": ``<`` for
``<=``, ``+`` for ``-``, a constant changed, an argument dropped, a string altered) and runs, for
each, the tests that reach the changed function, stopping at the first failure. A mutant no test
notices "survives": a bug the suite would let through, or a change that does not change
behaviour (an equivalent mutant). Each group below mutates one part of the code and runs only the
tests written for it, so that a run fits in an afternoon:

    lora    minilora/lora/          tests/lora, the API cases of tests/reliability/test_bad_input.py
    ops     minilora/ops/           tests/ops, tests/test_tensor.py, tests/nn
    optim   minilora/optim.py       tests/test_optim.py, tests/train, the API cases
    io      minilora/io/            tests/test_io.py, the hostile-file and lock tests

Each group works in its own copy of the tracked files, ``.mutation/<group>/`` (ignored by git),
so the worktree is never changed (``--only FILE`` mutates one file of the group, in
``.mutation/<group>-<file>/``, with the group's tests); a rerun re-copies the sources and mutmut
reuses the verdicts of the functions that did not change; it does not notice new or changed
tests, so after writing tests for survivors rerun with ``--fresh``. The script prints each
group's counts and score, the share of mutants killed, and writes the survivors to
``.mutation/<group>/survivors.txt``. To read one: ``cd .mutation/<group> && mutmut show <name>``.
Write a test for each survivor that is a real bug.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"

# group -> (files to mutate, as mutmut globs; the tests that may kill them)
GROUPS = {
    "lora": (["minilora/lora/*"], ["tests/lora", "tests/reliability/test_bad_input.py"]),
    "ops": (["minilora/ops/*"], ["tests/ops", "tests/test_tensor.py", "tests/nn"]),
    "optim": (["minilora/optim.py"], ["tests/test_optim.py", "tests/train",
                                      "tests/reliability/test_bad_input.py"]),
    "io": (["minilora/io/*"], ["tests/test_io.py", "tests/reliability/test_hostile_files.py",
                               "tests/reliability/test_lock.py"]),
}


# reads the package's source as text, where mutmut's copy holds every mutant's variant of it
DESELECT = ["--deselect",
            "tests/reliability/test_hostile_files.py::test_the_package_never_imports_pickle_or_allows_it"]


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def prepare(group: str, only: str | None = None) -> Path:
    """Copy the tracked files into .mutation/<group>/ (``only``: .mutation/<group>-<file>/) and
    add the group's mutmut settings."""
    work = WORK / (group if only is None else f"{group}-{Path(only).stem}")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, tracked):
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    mutate, tests = GROUPS[group]
    mutate = mutate if only is None else [only]
    settings = ("\n[tool.mutmut]\n"
                f"source_paths = {toml_list(['minilora'])}\n"
                f"only_mutate = {toml_list(mutate)}\n"
                f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
                f"pytest_add_cli_args = {toml_list(['-p', 'no:cacheprovider', *DESELECT])}\n"
                f"also_copy = {toml_list(['docs', 'examples', 'README.md'])}\n")  # tests read them
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + settings)
    return work


def run(group: str, jobs: int, only: str | None = None, fresh: bool = False) -> dict:
    """mutmut over one group (or one file of it); its counts, score and survivors."""
    work = prepare(group, only)
    if fresh:  # mutmut keeps a verdict while its function is unchanged, whatever the tests do
        shutil.rmtree(work / "mutants", ignore_errors=True)
    # the copy must import its own (mutated) minilora, never the worktree's
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MPLBACKEND": "Agg"}
    mutmut = [sys.executable, "-m", "mutmut"]
    subprocess.run([*mutmut, "run", "--max-children", str(jobs)], cwd=work, env=env, check=True)
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=work, env=env, check=True,
                   capture_output=True)
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    results = subprocess.run([*mutmut, "results"], cwd=work, env=env, check=True,
                             capture_output=True, text=True).stdout
    survivors = [line.split(":")[0].strip() for line in results.splitlines()
                 if line.rstrip().endswith(("survived", "no tests"))]
    (work / "survivors.txt").write_text("\n".join(survivors) + "\n")
    caught = stats["killed"] + stats["timeout"] + stats["segfault"]
    tried = stats["total"] - stats["skipped"]
    return {"group": group if only is None else only, "work": work, **stats,
            "score": caught / tried if tried else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help=f"which groups (default: all of "
                                                  f"{', '.join(GROUPS)})")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once")
    parser.add_argument("--only", metavar="FILE", help="mutate only this file of the one group "
                                                       "named, e.g. minilora/lora/config.py")
    parser.add_argument("--fresh", action="store_true", help="forget the last run's verdicts "
                                                             "(after adding or changing tests)")
    args = parser.parse_args()
    unknown = sorted(set(args.groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; the groups are {', '.join(GROUPS)}")
    if args.only is not None:
        if len(args.groups) != 1:
            parser.error("--only FILE needs exactly one group, the one FILE belongs to")
        globs = GROUPS[args.groups[0]][0]
        if not ((ROOT / args.only).is_file() and args.only.endswith(".py")
                and any(fnmatch.fnmatch(args.only, g) for g in globs)):
            parser.error(f"--only {args.only}: not a .py file of group {args.groups[0]} "
                         f"({', '.join(globs)})")
    if shutil.which("git") is None:
        raise SystemExit("tools/mutation.py needs git (it copies the tracked files)")
    try:
        import mutmut  # noqa: F401
    except ImportError:
        raise SystemExit("tools/mutation.py needs mutmut 3: pip install mutmut") from None
    rows = [run(group, args.jobs, args.only, args.fresh)
            for group in (args.groups or list(GROUPS))]
    print("\n| group | mutants | killed | timeout | survived | no tests | score |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['group']} | {row['total']} | {row['killed']} | {row['timeout']} | "
              f"{row['survived']} | {row['no_tests']} | {row['score']:.1%} |")
    print(f"\nsurvivors: {', '.join(str(r['work'] / 'survivors.txt') for r in rows)}")


if __name__ == "__main__":
    main()
