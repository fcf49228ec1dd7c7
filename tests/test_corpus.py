"""The onnx package's operator tests through ``edgefc.compile`` (issue 12): 0 crashes, 0 wrong
answers, each refusal listed with its reason (see tests/onnx_corpus.py for the verdicts).

The default run takes a deterministic sample, every ``EDGEFC_CORPUS_EVERY``-th case (default 4)
from offset ``EDGEFC_CORPUS_OFFSET`` (default 1: other cases than the acceptance check's
sample); ``EDGEFC_CORPUS_EVERY=1`` runs all of them (several minutes).
"""

from __future__ import annotations

import os

import pytest

from tests import onnx_corpus

EVERY = int(os.environ.get("EDGEFC_CORPUS_EVERY", "4"))
OFFSET = int(os.environ.get("EDGEFC_CORPUS_OFFSET", "1"))


@pytest.fixture(scope="module")
def verdicts():
    pytest.importorskip("onnx.backend.test.case.node")
    return onnx_corpus.run_all(onnx_corpus.cases(EVERY, OFFSET))


def test_corpus_has_no_crash_and_no_wrong_answer(verdicts):
    bad = [str(v) for v in verdicts if v.status in ("crash", "wrong")]
    assert not bad, "\n".join(bad)


def test_corpus_refusals_are_listed_and_few(verdicts, capsys):
    refused = [v for v in verdicts if v.status == "refused"]
    runnable = [v for v in verdicts if v.status != "n/a"]
    with capsys.disabled():
        print(f"\nonnx operator tests, every {EVERY}th from {OFFSET}: {onnx_corpus.summary(verdicts)}")
        for v in refused:
            print(f"  {v}")
    assert all(v.reason for v in refused)
    assert len(runnable) >= 0.5 * len(verdicts)  # the sample means something
    ok = sum(v.status == "ok" for v in verdicts)
    assert ok >= 0.9 * len(runnable), onnx_corpus.summary(verdicts)
