"""setup.py declares every third-party package that kangaroo and kangaroo_kernels import (`pip install .` then
`kangaroo demo` must work), in install_requires or an extra."""

import ast
import importlib.metadata as md
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_PARTY = {"kangaroo", "kangaroo_kernels"}


def _declared():
    """Normalised distribution names of setup.py's INSTALL_REQUIRES and EXTRAS_REQUIRE (read, not executed)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    values = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and t.id in ("INSTALL_REQUIRES", "EXTRAS_REQUIRE")}
    reqs = list(values["INSTALL_REQUIRES"]) + [r for extra in values["EXTRAS_REQUIRE"].values() for r in extra]
    return {_norm(re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0]) for r in reqs}


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(source: str):
    """Top-level names of absolute imports that are neither the standard library nor first party."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in FIRST_PARTY}


def undeclared(files, declared):
    """{import name: [files]} of imports whose distribution is not declared."""
    dists = md.packages_distributions()
    missing = {}
    for f in files:
        for name in third_party_imports(open(f).read()):
            candidates = {_norm(d) for d in dists.get(name, [])} | {_norm(name)}
            if not candidates & declared:
                missing.setdefault(name, []).append(os.path.relpath(f, ROOT))
    return missing


def _package_files():
    for pkg in ("python/kangaroo", "kangaroo_kernels"):
        for d, _, fs in os.walk(os.path.join(ROOT, pkg)):
            yield from (os.path.join(d, f) for f in fs if f.endswith(".py"))


def test_every_third_party_import_is_declared():
    files = list(_package_files())
    assert len(files) > 20
    assert undeclared(files, _declared()) == {}


def test_the_check_sees_an_undeclared_import(tmp_path):
    """Control: with tqdm left out of the declared set, the check names tqdm and train.py."""
    files = list(_package_files())
    missing = undeclared(files, _declared() - {"tqdm"})
    assert list(missing) == ["tqdm"] and "python/kangaroo/train.py" in missing["tqdm"]
    planted = tmp_path / "planted.py"
    planted.write_text("import json\nfrom kangaroo import model\nimport not_a_declared_pkg.sub\n")
    assert undeclared([str(planted)], _declared()) == {"not_a_declared_pkg": [os.path.relpath(planted, ROOT)]}


def _setup_kwarg(name):
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for kw in node.keywords:
                if kw.arg == name:
                    return ast.literal_eval(kw.value)
    raise AssertionError(f"setup() has no {name}=")


def test_every_package_and_the_shipped_model_are_installed():
    """A non-editable `pip install .` carries every subpackage (compat, ops, ...) and the shipped demo model."""
    import fnmatch

    packages = set(_setup_kwarg("packages"))
    found = set()
    for base, pkg in (("kangaroo_kernels", "kangaroo_kernels"), (os.path.join("python", "kangaroo"), "kangaroo")):
        for d, _, files in os.walk(os.path.join(ROOT, base)):
            if "__init__.py" in files:
                rel = os.path.relpath(d, os.path.join(ROOT, base))
                found.add(pkg if rel == "." else pkg + "." + rel.replace(os.sep, "."))
    assert found <= packages, f"packages missing from setup.py: {sorted(found - packages)}"
    globs = _setup_kwarg("package_data")["kangaroo"]
    model = os.path.join(ROOT, "python", "kangaroo", "default_model")
    shipped = [os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "python", "kangaroo"))
               for d, _, fs in os.walk(model) for f in fs]
    assert shipped, "no shipped model"
    for f in shipped:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f"{f} is not in package_data"
