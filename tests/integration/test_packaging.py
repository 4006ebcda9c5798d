"""A non-editable install carries everything `orchestrator db upgrade` needs, the Alembic scripts included.

The project is built into a wheel from a copy of its files (never this checkout's build/ or egg-info,
which setuptools would reuse), the wheel is installed into a directory of its own, and the installed
`orchestrator`, not this checkout's code, upgrades a fresh PostgreSQL database and a fresh SQLite file.
The dependencies are the running environment's (`--no-deps`), which keeps this to seconds; building the
wheel needs setuptools from pip's cache or index, as any `pip install .` does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from orchestrator.database import get_engine
from orchestrator.models import Base
from tests.conftest import ROOT
from tests.services import postgres_database

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: What a fresh clone would not have: build products and caches of this checkout.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "results"
)


@dataclass(frozen=True)
class Install:
    """The project as `pip install --target` lays it out: packages, and bin/ with the console script."""

    wheel: Path
    target: Path
    cwd: Path  # where the installed copy runs: no orchestrator/ or alembic/ in it

    def run(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        # Only the installed copy on the path: the checkout is not on PYTHONPATH, nor the working directory.
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        environ.update(PYTHONPATH=str(self.target), ORCH_HOME=str(self.cwd / "home"), **env)
        done = subprocess.run(argv, cwd=self.cwd, env=environ, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
        return done


def _pip(*args: str | Path) -> None:
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", *map(str, args)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCES)
    _pip("wheel", "--no-deps", "--wheel-dir", tmp / "wheels", source)
    (wheel,) = (tmp / "wheels").glob("*.whl")
    _pip("install", "--no-deps", "--no-index", "--target", tmp / "site", wheel)
    (tmp / "work").mkdir()
    return Install(wheel=wheel, target=tmp / "site", cwd=tmp / "work")


def _upgraded(url: str) -> tuple[set[str], str]:
    """The tables of the database at `url` and its Alembic revision."""
    with get_engine(url).connect() as conn:
        tables = set(inspect(conn).get_table_names())
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    return tables, version


def _head() -> str | None:
    return ScriptDirectory(str(ROOT / "alembic")).get_current_head()


def test_the_wheel_ships_the_migrations_as_package_data(installed: Install) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    scripts = [p for p in (ROOT / "alembic").rglob("*") if p.suffix in (".py", ".mako")]
    assert any(p.parent.name == "versions" for p in scripts)
    shipped = {f"orchestrator/migrations/{p.relative_to(ROOT / 'alembic').as_posix()}" for p in scripts}
    assert shipped <= names, shipped - names
    assert {"orchestrator/py.typed", "orchestrator/cli/__init__.py", "jobs/io.py"} <= names
    # Nothing else at the top: a top-level alembic/ installed into site-packages would replace the library.
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"orchestrator", "jobs"}


def test_what_runs_is_the_installed_copy(installed: Install) -> None:
    probe = (
        "import json, alembic, orchestrator, orchestrator.cli\n"
        "from orchestrator.database import migrations_location\n"
        "print(json.dumps([orchestrator.__file__, orchestrator.cli.__file__, str(migrations_location()),"
        " alembic.__file__]))"
    )
    package, cli, migrations, library = map(
        Path, json.loads(installed.run(sys.executable, "-c", probe).stdout)
    )
    for path in (package, cli, migrations):
        assert path.is_relative_to(installed.target), path
    assert migrations == installed.target / "orchestrator" / "migrations"
    assert (migrations / "env.py").is_file()
    # The library, never the migrations folder (the virtualenv may itself live in the checkout).
    assert not library.is_relative_to(installed.target) and not library.is_relative_to(ROOT / "alembic")
    assert library.name == "__init__.py" and (library.parent / "command.py").is_file()


def test_the_installed_command_upgrades_a_fresh_postgres_database(installed: Install) -> None:
    with postgres_database() as url:
        done = installed.run(
            str(installed.target / "bin" / "orchestrator"), "db", "upgrade", ORCH_DATABASE_URL=url
        )
        assert "is at head" in done.stdout
        tables, version = _upgraded(url)
    assert set(Base.metadata.tables) <= tables
    assert version == _head()


def test_python_m_orchestrator_upgrades_a_fresh_sqlite_file(installed: Install) -> None:
    url = f"sqlite:///{installed.cwd / 'fresh.db'}"
    done = installed.run(sys.executable, "-m", "orchestrator", "db", "upgrade", ORCH_DATABASE_URL=url)
    assert "is at head" in done.stdout
    tables, version = _upgraded(url)
    assert set(Base.metadata.tables) <= tables
    assert version == _head()
