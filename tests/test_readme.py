"""Claims about README.md: its Python examples run as written and give the shapes their
comments state (the operators, the linen layers, the NNX layers with a training step)."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def example(section: str) -> str:
    """The first ```python block under the README's `## <section>` heading."""
    text = README.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"no python example under '## {section}'"
    return blocks[0]


def run(section: str) -> dict:
    namespace = {"__name__": "readme_example"}
    exec(compile(example(section), f"README.md ({section})", "exec"), namespace)
    return namespace


def test_operators_example():
    ns = run("The operators")
    assert ns["y"].shape == (8, 56, 56, 128)
    assert ns["g"].shape == ns["rotation"].shape
    assert np.isfinite(np.asarray(ns["g"])).all()


def test_linen_example():
    ns = run("Flax modules")
    assert ns["y"].shape == (2, 32, 32, 16)
    assert ns["variables"]["params"]["inner_conv"]["kernel"].shape == (4, 4, 16)
    assert ns["state"]["intermediates"]["rotation"][0].shape == (2, 32, 32, 36)


def test_nnx_example():
    ns = run("Flax NNX")
    assert np.isfinite(float(ns["loss"]))
    assert ns["logits"].shape == (2, 10)
    assert ns["sown"]["dk"]["rotation"][0].shape == (2, 32, 32, 36)
    assert ns["model"].dk.inner_conv.kernel.shape == (4, 4, 16)
