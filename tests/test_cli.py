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


def test_prompt_ids_are_the_prompt_as_token_ids(tmp_path, capsys):
    """--prompt-ids takes the prompt's token ids (chat markers added as for text): same ids, same image."""
    from bagel_model.core.tokenizer import BagelTokenizer

    ids = [str(i) for i in BagelTokenizer.from_directory(None).encode("a red cube")]
    common = ["--steps", "3", "--size", "32", "--no-progress"]
    assert main(common + ["--prompt", "a red cube", "--out", str(tmp_path / "t.png")]) == 0
    assert main(common + ["--prompt-ids", *ids, "--out", str(tmp_path / "i.png")]) == 0
    assert _md5(tmp_path / "t.png") == _md5(tmp_path / "i.png")
    assert main(common + ["--prompt-ids", "100000", "--out", str(tmp_path / "x.png")]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["generate", "sweep"])
def test_every_option_has_help_with_its_real_default(which):
    import argparse

    from parallel.sweep import build_parser as sweep_parser

    parser = build_parser() if which == "generate" else sweep_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help text"
        if action.choices is None and action.type is None and action.nargs != 0 and action.dest in (
                "mode", "kv_layout", "config", "dtype", "cfg_renorm_type"):  # --device takes cuda:N: checked apart
            pytest.fail(f"{action.option_strings} is an enumeration without choices")
    text = parser.format_help()
    assert "(default: None)" not in text  # computed defaults are described, not shown as None
    if which == "sweep":
        assert "ulysses2xring2-exact" in text and "ring2-fast" in text  # the valid --only names are listed
        assert "--device" in text and "--threads" in text and "--timeout" in text
    else:
        flat = " ".join(text.split())  # argparse wraps lines anywhere
        assert "(default: 0)" in flat and "presets: tiny: 10; bagel-7b-mot: 50" in flat  # the resolver's defaults


def test_seed_varies_the_noise_and_weights_seed_the_model(tmp_path, capsys):
    def latent(*extra):
        assert main(["--steps", "2", "--size", "32", "--out", str(tmp_path / "x.png"), "--no-progress", *extra]) == 0
        return [l for l in capsys.readouterr().out.splitlines() if l.startswith("latent md5")][0]

    base = latent()
    assert latent("--seed", "0", "--weights-seed", "0") == base  # the defaults are today's single seed 0
    assert len({base, latent("--seed", "1"), latent("--weights-seed", "1")}) == 3


def test_the_cli_and_the_pipeline_give_the_same_image_with_the_same_defaults(tmp_path, capsys):
    """No sampling option given: the CLI resolves every default where the pipeline does (the model's largest image,
    its step count, its CFG settings), so ``pipe(prompt, seed=...)`` gives the CLI's latent and pixels."""
    from bagel_model.pipeline import BagelPipeline

    assert main(["--prompt", "a red cube", "--seed", "2", "--out", str(tmp_path / "c.png"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    pipe = BagelPipeline.from_preset("tiny")
    pipe.set_progress_bar_config(disable=True)
    res = pipe("a red cube", seed=2)
    assert f"latent md5 {res.latent_md5s[0]}" in out and f"pixels md5 {res.image_md5s[0]}" in out
    assert res.images[0].size == (256, 256) and "(256x256, 10 steps, seed 2)" in out  # tiny's largest, its steps


def test_a_prompts_file_is_one_batch_and_each_image_is_its_solo_run(tmp_path, capsys):
    """--prompts-file: request i (seed --seed + i) writes out-i.png, bit-identical to running that prompt alone."""
    (tmp_path / "p.txt").write_text("a red cube\n\n  a blue ball  \n")
    common = ["--steps", "3", "--size", "32", "--no-progress"]
    assert main(common + ["--prompts-file", str(tmp_path / "p.txt"), "--seed", "5", "--out", str(tmp_path / "b.png")]) == 0
    out = capsys.readouterr().out
    assert "[1] prompt 'a blue ball' seed 6" in out
    assert main(common + ["--prompt", "a blue ball", "--seed", "6", "--out", str(tmp_path / "solo.png")]) == 0
    capsys.readouterr()
    assert _md5(tmp_path / "b-1.png") == _md5(tmp_path / "solo.png")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main(common + ["--prompts-file", str(tmp_path / "empty.txt")]) == 2
    assert "holds no prompt" in capsys.readouterr().err


def test_fp8_activation_scaling_reaches_the_model(tmp_path, capsys):
    """--fp8-activation-scaling selects KernelOptions.fp8_activation_scaling: its default is the library's, and
    each scaling is its own bits."""
    from bagel_kernels import KernelOptions

    def latent(*extra):
        assert main(["--steps", "2", "--size", "32", "--out", str(tmp_path / "x.png"), "--no-progress",
                     "--quantization", "fp8", *extra]) == 0
        return [l for l in capsys.readouterr().out.splitlines() if l.startswith("latent md5")][0]

    assert build_parser().parse_args(["--prompt", "x"]).fp8_activation_scaling == \
        KernelOptions().fp8_activation_scaling
    base = latent()
    assert latent("--fp8-activation-scaling", KernelOptions().fp8_activation_scaling) == base
    assert len({base, latent("--fp8-activation-scaling", "row"), latent("--fp8-activation-scaling", "tensor")}) == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--prompt", "x", "--fp8-activation-scaling", "block"])
