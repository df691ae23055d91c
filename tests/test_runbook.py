"""The restore runbook in docs/operations.md, followed as written against a local replica.

Every `sh` block of the runbook section is extracted from the document and run by bash, in
order, with only the variables the runbook tells the operator to set replaced by this
incident's values (and `systemctl` recorded instead of run).  If the document changes, this
runs the new text; if it stops working, this fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.incident import (
    CUSTOMERS,
    GOOD_INVOICES,
    INVOICES,
    LATER_CUSTOMERS,
    Incident,
    count,
    make_incident,
)
from tests.procs import ROOT, clean_env, replicad

OPERATIONS = ROOT / "docs" / "operations.md"
_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
_ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=.*$", re.MULTILINE)

pytestmark = pytest.mark.skipif(shutil.which("sqlite3") is None, reason="needs the sqlite3 CLI")


def runbook_blocks() -> list[str]:
    """The `sh` blocks of the runbook section, in order."""
    text = OPERATIONS.read_text()
    start = text.index("## Restore runbook")
    end = text.index("\n## ", start + 1)
    return _BLOCK.findall(text[start:end])


def _with_values(block: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match[1]
        assert name in values, f"the runbook sets {name}, which this test does not know"
        return f"{name}={values[name]}"

    return _ASSIGNMENT.sub(replace, block)


def _run(script: str, calls: Path) -> subprocess.CompletedProcess[str]:
    prelude = f"""set -euo pipefail
export PATH={Path(sys.executable).parent}:$PATH
systemctl() {{ echo "$*" >> {calls}; }}
"""
    return subprocess.run(
        ["bash", "-c", prelude + script],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def _leave_a_wal(db: Path) -> None:
    """An application that committed one more customer and died before any checkpoint: the
    commit is only in app.db-wal.
    """
    script = (
        "import os, signal, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "conn.execute('PRAGMA wal_autocheckpoint=0')\n"
        "conn.execute(\"INSERT INTO customers (name) VALUES ('in the wal only')\")\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(db)], check=False, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert db.with_name(db.name + "-wal").stat().st_size > 0


@pytest.fixture
def incident(tmp_path: Path) -> Incident:
    return make_incident(tmp_path)


def test_the_runbook_keeps_its_promises() -> None:
    """What the issue found wrong stays fixed: quoted URL with region=auto, one -o per restore."""
    blocks = runbook_blocks()
    text = "\n".join(blocks)
    assert re.search(r"^URL='s3://[^']*&region=auto'", text, re.MULTILINE)
    assert "$URL" in text
    assert not re.search(r"\$URL(?!\")", text.replace('"$URL"', "")), "unquoted $URL"
    outputs = re.findall(r"replicad restore [^\n]*-o (\S+)", text)
    assert outputs
    assert len(outputs) == len(set(outputs))
    assert all("--dry-run" not in line for line in text.splitlines() if " -o " in line)


def test_following_the_runbook_repairs_then_swaps(incident: Incident, tmp_path: Path) -> None:
    found = replicad("find", incident.url, "--sql", "SELECT count(*) FROM invoices", "--json")
    assert found.returncode == 0, found.stderr
    bad = [json.loads(line) for line in found.stdout.splitlines()][-1]
    assert bad["after"] == 0
    log = replicad("log", incident.url, "--brief", "--json")
    times = [json.loads(line)["committed"] for line in log.stdout.splitlines()]
    work = tmp_path / "incident-work"
    values = {
        "URL": f"'{incident.url}'",
        "DB": str(incident.db),
        "WORK": str(work),
        "SINCE": times[0],
        "UNTIL": times[-1],
        "TXID": str(int(bad["txid"]) - 1),
    }
    blocks = [_with_values(block, values) for block in runbook_blocks()]
    swap = next(i for i, block in enumerate(blocks) if "systemctl stop app" in block)
    calls = tmp_path / "systemctl.calls"

    # Steps 0-5: find, log, dry run, restore beside, check, repair.
    result = _run("\n".join(blocks[:swap]), calls)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "before: 305" in result.stdout  # find's answer for the bad DELETE
    assert "FREED" in result.stdout  # log's mark on it
    assert '"target_committed"' in result.stdout  # the dry run's commit time
    assert count(work / "before.db", "invoices") == INVOICES + GOOD_INVOICES
    assert count(work / "app-before-repair.db", "invoices") == 0
    # The repair brought the invoices back and kept the customers added after the bad write.
    assert count(incident.db, "invoices") == INVOICES + GOOD_INVOICES
    assert count(incident.db, "customers") == CUSTOMERS + LATER_CUSTOMERS
    assert not calls.exists()  # nothing was stopped for the repair

    # Step 6: swap, with the application's last commit still only in its -wal.
    _leave_a_wal(incident.db)
    result = _run("\n".join([blocks[0], blocks[swap]]), calls)
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls.read_text().split("\n")[:4] == [
        "stop app",
        "stop replicad",
        "start replicad",
        "start app",
    ]
    # The swapped-in database is the restored state; the old one moved as a family, so it
    # still shows its last commit (it is only in the -wal beside it).
    assert not os.path.exists(f"{incident.db}-wal")  # no stale -wal beside the swapped-in file
    assert count(incident.db, "invoices") == INVOICES + GOOD_INVOICES
    assert count(incident.db, "customers") == CUSTOMERS
    assert count(work / "app.db", "customers") == CUSTOMERS + LATER_CUSTOMERS + 1
    assert sqlite3.connect(work / "app.db").execute("PRAGMA integrity_check").fetchone() == ("ok",)
