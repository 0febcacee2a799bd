"""The layers of docs/architecture.md, checked on the source: which way the imports go.

Every ``import minilora...`` in the package (at the top of a file or inside a function) goes to
the same layer or one below it; the fused ops' equations import nothing of the machinery; the
command line's parts import each other in one direction only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minilora"

# bottom to top, as docs/architecture.md lists them; a module may import its own layer and below
LAYERS = [
    ("minilora.errors", "minilora.configs"),
    ("minilora.tensor", "minilora.runtime", "minilora.data", "minilora.io"),
    ("minilora.ops",),
    ("minilora.nn", "minilora.optim"),
    ("minilora.lora", "minilora.models"),
    ("minilora.train", "minilora.hf"),
    ("minilora.check",),
    ("minilora.bench", "minilora.demo", "minilora.commands", "minilora.cli", "minilora.__main__"),
]
REFERENCE_OPS = ["activation", "attention", "dora", "grouped_attention", "lm_head",
                 "lora_embedding",
                 "lora_linear", "normalization", "rms_norm", "rotary", "softmax", "swiglu"]
# the imports that go up, on purpose: at the end of tensor.py, and inside a function
UPWARD = {
    ("minilora.tensor", "minilora.ops"),  # a Tensor's operators (x + y, x @ w) are the ops
    ("minilora.runtime", "minilora.ops.backend"),  # old names of the moved block helpers, warned
    # PEFT's and transformers' entry points where their users look: GPT.from_pretrained (and
    # LlamaForCausalLM's) and
    # model.save_pretrained, minilora.lora.save_adapter / load_adapter, inside a function each
    ("minilora.models.gpt", "minilora.hf"),
    ("minilora.models.llama", "minilora.hf"),
    ("minilora.lora", "minilora.hf"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def minilora_imports(path: Path) -> set[str]:
    """The minilora modules a file imports, anywhere in it (``from minilora import ops`` counts
    as ``minilora.ops``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minilora")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("minilora"):
            if node.module == "minilora":  # a subpackage, or a public name of the package itself
                found |= {f"minilora.{a.name}" if (PACKAGE / a.name).exists()
                          or (PACKAGE / f"{a.name}.py").exists() else "minilora"
                          for a in node.names}
            else:
                found.add(node.module)
    return found


def layer(module: str) -> int:
    if module == "minilora":  # the public names gather every layer: only the top may use them
        return len(LAYERS) - 1
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise LookupError(f"{module} is in no layer of LAYERS (and of docs/architecture.md)")


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_its_layer_and_those_below(path):
    """``minilora/__init__.py``, the public names, is the one file that gathers every layer."""
    name = module_name(path)
    upward = sorted(m for m in minilora_imports(path)
                    if layer(m) > layer(name) and (name, m) not in UPWARD)
    assert not upward, f"{name} (layer {layer(name)}) imports from above: {upward}"


@pytest.mark.parametrize("family", REFERENCE_OPS)
def test_an_equation_imports_none_of_the_machinery(family):
    """The reference ops read alone: no backend, no runtime (the kernels import them, not back)."""
    imports = minilora_imports(PACKAGE / "ops" / f"{family}.py")
    assert not {m for m in imports if m.startswith(("minilora.ops.backend", "minilora.runtime"))}


def test_lora_and_models_do_not_know_each_other():
    """LoRA adapts any Module by name; the GPT knows nothing of LoRA."""
    for side, other in (("lora", "minilora.models"), ("models", "minilora.lora")):
        for path in (PACKAGE / side).rglob("*.py"):
            assert not {m for m in minilora_imports(path) if m.startswith(other)}, path


@pytest.mark.parametrize("low, high", [("minilora.demo", "minilora.commands"),
                                       ("minilora.demo", "minilora.cli"),
                                       ("minilora.commands", "minilora.cli")])
def test_the_command_line_imports_one_way(low, high):
    """cli (parsing) -> commands (handlers) -> demo (the main job): never back."""
    path = PACKAGE / f"{low.rpartition('.')[2]}.py"
    assert high not in minilora_imports(path)


def test_the_check_sees_imports_inside_functions():
    """The check could fail: cli imports the commands inside main(), and that is found."""
    assert "minilora.commands" in minilora_imports(PACKAGE / "cli.py")
    assert layer("minilora.ops.backend.products") == layer("minilora.ops")
