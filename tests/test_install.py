"""`pip install .` puts one top-level package, `dreamsteer`, with its configs and a working `dreamsteer` script."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO_ROOT
from dreamsteer.train.tasks import TASKS

# what a build must not see: environments, run outputs, build leftovers (a copy keeps the checkout untouched)
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv*", "outputs", "lightning_logs", "build", "*.egg-info", "__pycache__", ".pytest_cache")


def test_pip_install_adds_only_the_dreamsteer_namespace_and_its_script(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCES)
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)

    assert sorted(p.name for p in target.iterdir()) == ["bin", "dreamsteer", "dreamsteer-0.1.0.dist-info"]
    package = target / "dreamsteer"
    sources = {d.name for d in REPO_ROOT.iterdir() if (d / "__init__.py").is_file() and d.name != "tests"}
    assert {d.name for d in package.iterdir() if (d / "__init__.py").is_file()} == sources  # every subpackage listed in pyproject
    configs = {p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "conf").rglob("*.yaml")}
    assert configs and {p.relative_to(package) for p in (package / "conf").rglob("*.yaml")} == configs
    builtin = {p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "diffusion" / "builtin").rglob("*") if p.is_file()}
    assert builtin and {p.relative_to(package) for p in (package / "diffusion" / "builtin").rglob("*") if p.is_file()} == builtin

    # the installed copy, not the checkout: PYTHONPATH is the install target alone, the working directory elsewhere
    env = dict(os.environ, PYTHONPATH=str(target))
    where = subprocess.run([sys.executable, "-c", "import dreamsteer; print(dreamsteer.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(package / "__init__.py")
    result = subprocess.run([str(target / "bin" / "dreamsteer"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: dreamsteer <task>")
    for name, (_, description) in TASKS.items():
        assert f"  {name} " in result.stdout and description in result.stdout
