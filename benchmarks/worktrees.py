"""Two revisions of this repository checked out side by side, for benchmarks that compare them in one run."""
from __future__ import annotations

import contextlib
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve(revs) -> list:
    """Short commit ids for revision names (``HEAD~1``, a branch): what was measured, not a name that moves."""
    return [subprocess.run(["git", "-C", REPO, "rev-parse", "--short", r], check=True, capture_output=True,
                           text=True).stdout.strip() for r in revs]


@contextlib.contextmanager
def worktrees(revs, scratch: str):
    """{commit: folder} with each revision checked out in a detached git worktree under ``scratch``; removed
    on exit. Run a revision with ``PYTHONPATH=folder`` so that its own ``jaxunlearn`` is imported."""
    if len(set(revs)) != len(revs):
        raise ValueError(f"revisions named twice: {revs}")
    trees = {}
    try:
        for rev in revs:
            path = os.path.join(scratch, f"tree-{len(trees)}")
            subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-q", path, rev], check=True)
            trees[rev] = path
        yield trees
    finally:
        for path in trees.values():
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", path], check=False)
        subprocess.run(["git", "-C", REPO, "worktree", "prune"], check=False)  # any left half-made
