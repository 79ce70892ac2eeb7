import hashlib

import pytest

from bagel_model.cli import build_parser, main


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_generate_writes_identical_png_twice(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    args = ["--config", "tiny", "--prompt", "a red cube", "--seed", "0", "--steps", "3", "--size", "32", "--no-progress"]
    assert main(args + ["--out", str(a)]) == 0
    out1 = capsys.readouterr().out
    assert main(args + ["--out", str(b)]) == 0
    out2 = capsys.readouterr().out
    assert open(a, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert _md5(a) == _md5(b)
    md5_line = [l for l in out1.splitlines() if l.startswith("latent md5")]
    assert md5_line and md5_line[0] in out2 and str(a) in out1


def test_help_explains_options():
    text = build_parser().format_help()
    for flag in ("--config", "--checkpoint", "--prompt", "--seed", "--steps", "--size", "--out", "--device", "--dtype"):
        assert flag in text


@pytest.mark.parametrize("args,msg", [(["--size", "40"], "multiple of 16"), (["--config", "nope"], "invalid choice: 'nope'"),
                                      (["--prompt", ""], "prompt is empty"), (["--checkpoint", "/nonexistent"], "not found")])
def test_bad_input_exits_with_a_message(tmp_path, capsys, args, msg):
    assert main(args + ["--out", str(tmp_path / "x.png"), "--steps", "2", "--no-progress"]) == 2
    assert msg in capsys.readouterr().err


def test_cli_modes_and_split(tmp_path, capsys):
    from bagel_model.cli import main

    src = str(tmp_path / "in.png")
    assert main(["--steps", "3", "--size", "32", "--out", src, "--no-progress"]) == 0
    assert main(["--mode", "img2img", "--steps", "3", "--out", str(tmp_path / "x.png"), "--no-progress"]) == 2
    assert "needs --image" in capsys.readouterr().err
    assert main(["--mode", "img2img", "--image", src, "--steps", "3", "--out", str(tmp_path / "e.png"),
                 "--no-progress"]) == 0
    single = capsys.readouterr().out
    assert main(["--mode", "img2img", "--image", src, "--steps", "3", "--out", str(tmp_path / "s.png"), "--split",
                 "--max-tokens", "3", "--kv-layout", "packed"]) == 0
    split = capsys.readouterr().out
    md5 = lambda out: [l for l in out.splitlines() if l.startswith("pixels md5")]
    assert md5(single) == md5(split) and md5(single)
    assert main(["--mode", "img2text", "--image", src, "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("text: ")
