"""ProgressLog: long one-off work (a first-start GGUF conversion) logs how far it is, quick work
logs nothing."""

from __future__ import annotations

import logging

from sutra.model.progress_log import ProgressLog


def test_logs_done_of_total_once_the_interval_has_passed(caplog):
    caplog.set_level(logging.INFO, logger="sutra.model")
    progress = ProgressLog("dequantizing model.gguf", 200, "tensors", interval_s=0.0)
    progress.update(50)
    assert "dequantizing model.gguf: 50 of 200 tensors (25%)" in caplog.text


def test_quick_work_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="sutra.model")
    progress = ProgressLog("dequantizing model.gguf", 200, "tensors", interval_s=60.0)
    for done in range(200):
        progress.update(done)
    assert caplog.text == ""
    ProgressLog("empty", 0, "tensors", interval_s=0.0).update(0)  # no division by zero
    assert caplog.text == ""
