"""The code's tables equal those of docs/job-model.md (the contract), cell by
cell, and docs/job-tables.md is generated from them; transition() enforces
the matrix for all 121 cells."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from blkjobs.errors import JobError
from blkjobs.jobmodel import status as st
from blkjobs.jobmodel.status import JobStatus, JobVerb

REPO = Path(__file__).resolve().parent.parent
CONTRACT = REPO / "docs" / "job-model.md"
DOC = REPO / "docs" / "job-tables.md"


def _contract_table(header_prefix: str) -> tuple[list[str], dict[str, set[str]]]:
    """Parse the markdown table whose header starts with ``header_prefix``:
    (column letters, row label -> set of letters with a check mark)."""
    lines = CONTRACT.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_prefix))
    cols = [c.strip() for c in lines[start].strip("|").split("|")][1:]
    rows: dict[str, set[str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(cols) + 1, line
        assert set(cells[1:]) <= {"", "✔"}, line
        rows[cells[0]] = {c for c, v in zip(cols, cells[1:], strict=True) if v == "✔"}
    return cols, rows


def _letters(states) -> set[str]:
    return {st.LETTER[s] for s in states}


def test_contract_is_in_the_repository():
    assert CONTRACT.is_file(), f"contract not found at {CONTRACT}"


def test_transition_matrix_equals_contract():
    cols, rows = _contract_table("| from \\ to |")
    assert cols == [st.LETTER[s] for s in JobStatus]
    code = {f"**{st.LETTER[s]}** {s.value}": _letters(st.TRANSITIONS[s]) for s in JobStatus}
    assert rows == code
    assert sum(len(v) for v in rows.values()) == 20     # the contract's edge count


def test_verb_table_equals_contract():
    cols, rows = _contract_table("| verb \\ state |")
    assert cols == [st.LETTER[s] for s in JobStatus]
    assert list(rows) == [v.value for v in st.VERBS]      # same rows, same order
    assert rows == {v.value: _letters(states) for v, states in st.VERBS.items()}
    assert set(st.VERBS) == set(JobVerb)


def test_enum_orders_are_the_wire_orders():
    assert [s.value for s in JobStatus] == [
        "undefined", "created", "running", "paused", "ready", "standby", "waiting",
        "pending", "aborting", "concluded", "null"]
    assert [v.value for v in JobVerb] == [
        "cancel", "pause", "resume", "set-speed", "complete", "dismiss", "finalize", "change"]


def test_rendered_tables_equal_docs_file():
    assert DOC.read_text(encoding="utf-8") == st.render_tables()


def test_rendered_table_lines_appear_verbatim_in_contract():
    contract_lines = set(CONTRACT.read_text(encoding="utf-8").splitlines())
    table_lines = [ln for ln in st.render_tables().splitlines() if ln.startswith("|")]
    assert len(table_lines) == 2 * 2 + 11 + 8
    assert [ln for ln in table_lines if ln not in contract_lines] == []


class _Dummy:
    def __init__(self, status):
        self.id = "j"
        self.status = status
        self.changes = []

    def _status_changed(self, old, new):
        self.changes.append((old, new))


@pytest.mark.parametrize("old", list(JobStatus))
@pytest.mark.parametrize("new", list(JobStatus))
def test_transition_every_cell(old, new):
    job = _Dummy(old)
    if new in st.TRANSITIONS[old]:
        st.transition(job, new)
        assert job.status is new
        # an event for every change, none for the X->X self-edge
        assert job.changes == ([] if new is old else [(old, new)])
    else:
        with pytest.raises(st.IllegalTransition):
            st.transition(job, new)
        assert job.status is old and job.changes == []


@pytest.mark.parametrize("verb", list(JobVerb))
@pytest.mark.parametrize("state", list(JobStatus))
def test_check_verb_every_cell(verb, state):
    if state in st.VERBS[verb]:
        st.check_verb("job0", state, verb)
    else:
        with pytest.raises(JobError) as e:
            st.check_verb("job0", state, verb)
        assert str(e.value) == (f"Job 'job0' in state '{state.value}' "
                                f"cannot accept command verb '{verb.value}'")
        assert e.value.qmp_class == "GenericError"


def test_refusal_examples_from_iotests_219():
    cases = [("running", "complete"), ("ready", "finalize"), ("pending", "pause"),
             ("concluded", "finalize")]
    for s, v in cases:
        with pytest.raises(JobError, match=re.escape(
                f"Job 'job0' in state '{s}' cannot accept command verb '{v}'")):
            st.check_verb("job0", JobStatus(s), JobVerb(v))
