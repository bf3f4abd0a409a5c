"""Install hints in messages and docs name what can be installed: extras that setup.cfg declares."""

import configparser
import os
import re
import sys

import pytest

from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.teachers import hub
from tests.helpers import REPO

# `pip install -e '.[aot]'`, `pip install 'hybrid_distill_jax[hub]'`, ...: the extras named.
_EXTRA = re.compile(r"pip install[^\n]*?(?:\.|hybrid_distill_jax)\[([\w,-]+)\]")
_SOURCES = ("hybrid_distill_jax", "docs", "launch", "scripts", "configs", "README.md", "Makefile")


def _texts():
    """(path, text) of every file the hints can be in."""
    for source in _SOURCES:
        path = os.path.join(REPO, source)
        files = [path] if os.path.isfile(path) else []
        for folder, _, names in os.walk(path):  # nothing for a file
            files += [os.path.join(folder, n) for n in names if n.endswith((".py", ".md", ".sh"))]
        for file in files:
            with open(file, encoding="utf-8") as f:
                yield os.path.relpath(file, REPO), f.read()


def test_every_extra_named_in_an_install_hint_exists():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    declared = set(cfg["options.extras_require"])
    named = {
        (path, extra)
        for path, text in _texts()
        for group in _EXTRA.findall(text)
        for extra in group.split(",")
    }
    assert ("README.md", "cuda") in named and ("hybrid_distill_jax/aot/targets.py", "aot") in named
    unknown = sorted((p, e) for p, e in named if e not in declared)
    assert not unknown, f"{unknown}: not among setup.cfg's extras {sorted(declared)}"


@pytest.mark.parametrize("module", ["huggingface_hub", "safetensors"])
def test_a_hub_name_without_its_packages_says_what_to_install(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # the next import of it fails
    with pytest.raises(ConfigError) as e:
        hub.resolve("hf-hub:timm/deit_base_patch16_224.fb_in1k", "teachers.deit.checkpoint")
    assert f"({module}): pip install huggingface_hub safetensors" in str(e.value)
