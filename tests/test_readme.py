"""README.md tells the truth: its fresh-machine commands are CI's, its sweep output is the script's, its Python
example runs."""
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path: str) -> str:
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def _commands(lines) -> list[str]:
    """Shell commands of a script or a fenced block: comments, blank lines and CI's own preamble left out, each
    ``a && b`` line split into its commands, whitespace normalized."""
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or line.startswith(("set ", "cd ")):
            continue
        out.extend(" ".join(part.split()) for part in line.split("&&"))
    return out


def readme_script_module():
    spec = importlib.util.spec_from_file_location("readme_output", os.path.join(ROOT, "scripts", "readme_output.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_fresh_machine_commands_are_the_ones_ci_runs():
    readme = _read("README.md")
    block = re.search(r"On a fresh machine.*?```bash\n(.*?)```", readme, flags=re.S).group(1)
    documented = _commands(block.splitlines())
    ci = _commands(_read(".ci", "run").splitlines())
    ci = [c.replace("pip install -q ", "pip install ") for c in ci]  # CI only quiets pip
    sweep = "torchrun --nproc-per-node 4 -m parallel.sweep"
    assert sweep in documented  # the main job; CI leaves it to tests/test_parallel.py
    assert ci == [c for c in documented if c != sweep]
    assert ci[0] == "python3 -m venv .venv" and ci[1] == ". .venv/bin/activate"  # the install goes into a venv
    assert any(c.startswith("python3 -m pip install ") and '-e ".[test]"' in c for c in ci)
    assert ci[-1] == "python3 -m pytest -q"


def test_readme_sweep_output_is_the_scripts_block():
    mod = readme_script_module()
    readme = _read("README.md")
    block = mod.block(readme)
    rows = mod.rows(block)
    assert {"single", "single-per-branch"} <= set(rows) and any(c.startswith("batch3-") for c in rows)
    assert mod.header(block).startswith("bagel-sweep: preset tiny, world 4")
    base = rows["single"][1]
    assert all(md5 == base for _, md5, match in rows.values() if match == "yes")
    assert "ALL EXACT CONFIGS MATCH" in block and f"$ {mod.COMMAND}" in block
    # the block is exactly what render() writes for its own content: written by the script, not by hand
    stdout = block.split(f"$ {mod.COMMAND}\n", 1)[1].split("\n```\n", 1)[0]
    m = re.search(r"on (\S+): (.*); (\d+) s wall clock", block)
    assert mod.render(stdout, float(m.group(3)), m.group(1), m.group(2)) == block


def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = _read("README.md")
    code = re.search(r"## Python API\n.*?```python\n(.*?)```", readme, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    out, batch = namespace["out"], namespace["batch"]
    assert (tmp_path / "cube.png").is_file() and (tmp_path / "tiny-ckpt" / "ema.safetensors").is_file()
    assert batch.latent_md5s[0] == out.latent_md5s[0]  # "a red cube", seed 0, alone and in the batch
    assert isinstance(namespace["answer"], str)
