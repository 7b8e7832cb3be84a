"""`sutra profile` writes a profile that loads back and says how well the cost model fits it."""

from __future__ import annotations

import pytest

from sutra.cli import main
from sutra.sim.profile import Profile


def test_sutra_profile_writes_a_profile_and_reports_the_fit(tmp_path, capsys):
    out = tmp_path / "p.json"
    main(
        [
            "profile",
            "--model",
            "random:tiny-llama",
            "--dtype",
            "float32",
            "--num-kv-blocks",
            "128",
            "--output",
            str(out),
            "--chunks",
            "32,128",
            "--contexts",
            "0,256",
            "--batches",
            "1,8",
            "--reps",
            "2",
        ]
    )
    profile = Profile.load(out)
    assert (len(profile.prefill), len(profile.decode)) == (4, 4)
    assert profile.dtype == "float32" and profile.block_size == 16
    printed = capsys.readouterr().out
    assert "cost model: constant=" in printed and "fit error: median" in printed


def test_a_grid_too_small_to_fit_is_saved_and_says_so(tmp_path, capsys):
    out = tmp_path / "whole-prompts.json"
    argv = ["profile", "--model", "random:tiny-llama", "--dtype", "float32", "--num-kv-blocks", "128"]
    main(
        argv
        + ["--output", str(out), "--chunks", "256,512", "--contexts", "0", "--batches", "1", "--reps", "1"]
    )
    profile = Profile.load(out)
    assert [(p.chunk, p.context) for p in profile.prefill] == [(256, 0), (512, 0)] and len(
        profile.decode
    ) == 1
    printed = capsys.readouterr().out
    assert "no cost model fitted (a profile needs at least 6 points, got 3); the points are saved" in printed


def test_bad_sizes_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--output", "x.json", "--chunks", "16,a"])
    assert "comma-separated integers" in capsys.readouterr().err
    for reps in ("0", "two"):
        with pytest.raises(SystemExit):
            main(["profile", "--output", "x.json", "--reps", reps])
        assert "expected an integer >= 1" in capsys.readouterr().err
