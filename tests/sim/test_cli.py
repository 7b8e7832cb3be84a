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


def test_bad_sizes_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--output", "x.json", "--chunks", "16,a"])
    assert "comma-separated integers" in capsys.readouterr().err
