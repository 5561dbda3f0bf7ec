"""Docs that run: every Python block of the README (in order, one fresh process, in a scratch directory; the export
block loads the zoo backbone shipped in export/models/) and the Python block of an export's model-card README (in a
tiny export's directory).
A moved function or a renamed endpoint fails here instead of a user."""
import os
import re

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("docs_export")   # its module fixture is built once, in one process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A working directory with a tiny exported backbone at exports/wcl_tiny (every format)."""
    from tfssl.backbones import build_backbone
    from tfssl.export import export_backbone
    root = tmp_path_factory.mktemp("docs")
    keras.utils.set_random_seed(0)
    card = export_backbone(build_backbone("tiny", mean=(0.3,) * 3, std=(0.3,) * 3), str(root / "exports" / "wcl_tiny"))
    return root, card


def _run(code, where, namespace, label):
    cwd = os.getcwd()
    os.chdir(where)
    try:
        exec(compile(code, label, "exec"), namespace)
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_every_python_block_of_the_readme_runs(scratch):
    """In a fresh Python process, as a user runs them: a block's own ``tf.distribute.MirroredStrategy()`` would
    otherwise be a second strategy over the suite's two logical CPUs, whose collectives collide with the first's."""
    import json
    import subprocess
    import sys
    root, _ = scratch
    blocks = python_blocks(open(os.path.join(ROOT, "README.md")).read())
    assert len(blocks) >= 2
    script = "\n".join(f"# README.md python block {i + 1}\n{b}" for i, b in enumerate(blocks))
    script += "\nimport json, numpy\njson.dump(list(numpy.asarray(features).shape), open('features.json', 'w'))\n"
    (root / "readme_blocks.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "readme_blocks.py"], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.path.isfile(root / "ressl.keras") and os.path.isfile(root / "exports" / "ressl_tiny" / "backbone.keras")
    assert len(json.load(open(root / "features.json"))) == 2


def test_the_model_card_readme_block_runs(scratch):
    root, card = scratch
    export = root / "exports" / "wcl_tiny"
    blocks = python_blocks(open(export / "README.md").read())
    assert len(blocks) == 1 and card["name"] == "wcl_tiny"
    x = np.random.default_rng(1).uniform(0, 1, (3, 32, 32, 3)).astype("float32")
    namespace = {"float_images": x, "uint8_images": (x * 255).astype("uint8")}
    _run(blocks[0], export, namespace, "model card README python block")
    assert np.asarray(namespace["features"]).shape == (3, 64)
    assert namespace["tunable"].trainable
