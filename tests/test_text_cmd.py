"""`arvid text train-spm`: its flags."""

import pytest

from arvid.cli import build_parser


def test_a_vocabulary_below_4_is_the_flags_error(capsys, tmp_path):
    """`--vocab-size 2` failed inside train_spm with "vocab_size must be >= 4", not naming the flag."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["text", "train-spm", "--input", "c.txt", "--out", str(tmp_path), "--vocab-size", "2"])
    assert e.value.code == 2
    assert "argument --vocab-size: expected an integer >= 4, got 2" in capsys.readouterr().err
    args = build_parser().parse_args(["text", "train-spm", "--input", "c.txt", "--out", str(tmp_path), "--vocab-size", "4"])
    assert args.vocab_size == 4
