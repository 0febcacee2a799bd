"""LoRA+ (Hayou et al., 2024): B learns ``loraplus_lr_ratio`` times faster than A.

    A at lr      B at lr * loraplus_lr_ratio      an Embedding's adapter at loraplus_lr_embedding

The paper's argument (docs/variants.md): in ``ΔW = s B A`` with B = 0 at the start, one learning
rate for both is efficient for only one of them as the width grows; B needs a larger one. This is
PEFT's ``peft.optimizers.create_loraplus_optimizer``, group for group, over minilora's optimizers.
"""

from __future__ import annotations

from minilora.configs import positive_number
from minilora.lora.layer import LoRAEmbedding
from minilora.nn import LayerNorm, Module

GROUPS = ("groupA", "embedding", "groupB", "groupB_no_decay")  # PEFT's groups, in its order


def loraplus_groups(model: Module) -> dict[str, list[tuple[str, object]]]:
    """PEFT's rule, parameter by trainable parameter, in model order, as (name, Parameter):

    - ``embedding``: a parameter of an adapted Embedding (``lora_embedding_A``, ``_B``);
    - ``groupB``: ``lora_B`` and every other 1-D parameter, when it decays: its name holds no
      ``bias`` and it is not a LayerNorm's (transformers' ``ALL_LAYERNORM_LAYERS`` is
      ``nn.LayerNorm`` alone, so an RMSNorm's weight decays, as in PEFT);
    - ``groupB_no_decay``: the rest of those (biases, LayerNorm weights);
    - ``groupA``: everything else, ``lora_A`` and any matrix trained in full.
    """
    groups: dict[str, list] = {name: [] for name in GROUPS}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, LoRAEmbedding):
                group = "embedding"
            elif "lora_B" in name or p.ndim == 1:
                decays = "bias" not in name and not isinstance(module, LayerNorm)
                group = "groupB" if decays else "groupB_no_decay"
            else:
                group = "groupA"
            groups[group].append((name, p))
    return groups


def create_loraplus_optimizer(model: Module, optimizer_cls, *, lr: float,
                              loraplus_lr_ratio: float, **kwargs):
    """PEFT's ``create_loraplus_optimizer``: ``optimizer_cls`` (``AdamW``, ``SGD``) over PEFT's
    four groups (``GROUPS``, empty ones kept), each with its rate and weight decay:

        groupA            lr                        loraplus_weight_decay
        embedding         loraplus_lr_embedding     loraplus_weight_decay
        groupB            lr * loraplus_lr_ratio    loraplus_weight_decay
        groupB_no_decay   lr * loraplus_lr_ratio    0

    kwargs: ``loraplus_weight_decay`` (default 0.0), ``loraplus_lr_embedding`` (default 1e-6),
    the rest for ``optimizer_cls`` (``betas``, ``eps``). A schedule's ``set_lr`` keeps the ratios.
    """
    owner = "create_loraplus_optimizer"
    lr = positive_number(owner, "lr", lr)
    ratio = positive_number(owner, "loraplus_lr_ratio", loraplus_lr_ratio)
    decay = kwargs.pop("loraplus_weight_decay", 0.0)
    embedding_lr = kwargs.pop("loraplus_lr_embedding", 1e-6)
    groups = loraplus_groups(model)
    settings = {"groupA": (lr, decay), "embedding": (embedding_lr, decay),
                "groupB": (lr * ratio, decay), "groupB_no_decay": (lr * ratio, 0.0)}
    return optimizer_cls([{"params": groups[g], "lr": settings[g][0],
                           "weight_decay": settings[g][1]} for g in GROUPS], lr=lr, **kwargs)
