"""PyTorch is an optional extra for benchmarks/peer_torch.py only: the library and its tests never import it."""
import os
import re
import subprocess
import sys

from conftest import REPO


def test_library_and_tests_never_import_torch():
    pattern = re.compile(r"^\s*(import torch|from torch)", re.M)
    offenders = []
    for top in ("jaxunlearn", "tests"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py") and pattern.search(open(os.path.join(root, f)).read()):
                    offenders.append(os.path.join(root, f))
    assert not offenders, offenders
    # and importing every module of the library pulls no torch in through a dependency
    code = ("import pkgutil, importlib, sys, jaxunlearn\n"
            "for m in pkgutil.walk_packages(jaxunlearn.__path__, 'jaxunlearn.'):\n"
            "    m.name.endswith('__main__') or importlib.import_module(m.name)\n"
            "print(sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
