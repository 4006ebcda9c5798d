"""A database URL that cannot be used is reported without its password, by the API and by the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.database import get_engine
from orchestrator.errors import ConfigurationError
from tests.integration.test_cli import Cli

pytestmark = pytest.mark.integration

BAD_URLS = [
    "postgresql+bogus://orch:s3cret@db.example/orch",  # a driver that does not exist
    "postgresql+psycopg://orch:s3cret@db.example:notaport/orch",  # SQLAlchemy cannot parse it
    "postgresql+bogus://orch:s3cret%40x@db.example/orch",  # percent-encoded
    "mysql+nodriver://orch:s3cret@db.example/orch",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_database_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(ConfigurationError, match="cannot use database URL") as caught:
        get_engine(url)
    message = str(caught.value)
    assert "s3cret" not in message
    assert "orch:***@db.example" in message  # still says which URL, with the password masked
    # Nothing chained to it carries the password either (a traceback would print it).
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("url", BAD_URLS[:2])
def test_the_cli_reports_a_bad_url_without_its_password(tmp_path: Path, url: str) -> None:
    run = Cli.on(tmp_path, ORCH_DATABASE_URL=url)
    refused = run("list", code=1)
    assert refused.stderr.startswith("error: cannot use database URL ")
    assert "s3cret" not in refused.stderr and "Traceback" not in refused.stderr
