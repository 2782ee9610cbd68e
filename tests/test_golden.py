"""The refactor guard: a fixed-seed run's JSONL equals the committed reference to float tolerance."""

from __future__ import annotations

import json

import pytest

from tests.golden import REFERENCE, compare, golden_run


def test_golden_run_matches_the_committed_reference(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    want = [json.loads(line) for line in REFERENCE.read_text().splitlines()]
    got = golden_run(tmp_path)
    problems = compare(got, want)
    assert not problems, "\n".join(problems[:20])
