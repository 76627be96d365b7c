"""benchmarks/ab.py: two environments' training steps, interleaved."""

from __future__ import annotations

import pytest

from benchmarks import ab


def test_assignments_are_key_value_pairs_and_a_bad_one_names_its_flag():
    assert ab.parse_assignments("--a", ["XLA_FLAGS=--x=1 --y=2", "EMPTY="]) == {
        "XLA_FLAGS": "--x=1 --y=2", "EMPTY": ""}
    for bad in ("NOEQUALS", "1KEY=1", "=1"):
        with pytest.raises(ValueError, match=f"--b '{bad}': expected KEY=VALUE"):
            ab.parse_assignments("--b", [bad])


def test_summary_takes_the_median_of_the_pairs_ratios():
    text = ab.summary([2.0, 2.0, 2.0], [1.0, 1.0, 4.0], batch_size=8)
    assert "A: median step 2.000 s (4.00 images/s)" in text
    assert "B: median step 1.000 s (8.00 images/s)" in text
    assert "median 2.000 (quartiles 1.250-2.000); B faster in 2 of 3 pairs" in text


@pytest.mark.parametrize("argv, message", [(["--pairs=0", "resnet18_torch"], "--pairs=0"),
                                           (["--a=oops", "resnet18_torch"], "--a 'oops'"),
                                           (["no_such_net"], "unknown backbone 'no_such_net'"),
                                           (["--b_checkout=/nonexistent", "resnet18_torch"],
                                            "--b_checkout=/nonexistent: expected a checkout")])
def test_bad_arguments_name_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit):
        ab.main(argv)
    assert message in capsys.readouterr().err


def test_two_workers_take_turns_and_a_failing_one_is_reported(capsys):
    """ResNet-18 at 32 px, batch 2: XLA's convolutions (A, its worker named by --a_checkout)
    against the defaults (B), 2 pairs; then
    a side whose environment breaks its step (an unknown BONEAGE_CPU_CONV)."""
    common = ["resnet18_torch", "--image_size=32", "--batch_size=2", "--pairs=2", "--quiet_workers"]
    assert ab.main(common + ["--a=BONEAGE_CPU_CONV=xla", f"--a_checkout={ab.REPO}"]) == 0
    out = capsys.readouterr().out
    assert f"A: BONEAGE_CPU_CONV=xla, code from {ab.REPO}" in out and "B: (this environment)\n" in out
    assert "pair 2/2: A " in out and "B faster in " in out and "of 2 pairs" in out
    assert ab.main(common + ["--b=BONEAGE_CPU_CONV=bogus"]) == 1
    assert "error: worker B stopped (exit status 1)" in capsys.readouterr().err
