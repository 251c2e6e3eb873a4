"""replica_init's q/k-norm step: every q/k norm of a strong-init replica sees eps_headroom x its eps.

Before the step, a Qwen3 replica's q/k norms saw inputs thousands of times their eps, so a port with
the wrong q/k-norm eps matched (the sensitivity mutation moved the logits by 3e-4 nats).
"""

from __future__ import annotations

import json

import pytest

import model_anatomy
from replica_init import InitOptions

# The measured mean square must land within this factor of the target (the loop settles to 2%).
SETTLED_FACTOR = 1.1


def build(tmp_path, config_class: str, architecture: str, **edits):
    import transformers
    from make_tiny_model import ReplicaOptions, build_replica

    config = getattr(transformers, config_class)().to_dict()
    config.update(architectures=[architecture], **edits)
    build_replica(config, tmp_path / "replica", ReplicaOptions())
    return tmp_path / "replica"


@pytest.mark.parametrize("config_class, architecture, edits", [
    ("Qwen3Config", "Qwen3ForCausalLM", {}),
    ("CohereConfig", "CohereForCausalLM", {"use_qk_norm": True}),
])
def test_every_qk_norm_sees_the_eps_headroom(tmp_path, config_class, architecture, edits):
    import torch
    from transformers import AutoModelForCausalLM

    from replica_init import PROMPT, is_mean_centred, norm_eps

    folder = build(tmp_path, config_class, architecture, **edits)
    manifest = json.loads((folder / "tiny_replica.json").read_text())
    assert manifest["init"]["calibration"]["qk_norms"]["status"] == "applied"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layout = model_anatomy.resolve_layout(model)
    paths = [p for b in layout.blocks for p in (b.attention.q_norm, b.attention.k_norm) if p]
    assert paths, "the resolver found no q/k norms"
    seen: dict[str, float] = {}

    def hook_for(path):
        def hook(module, inputs):
            x = inputs[0].float()
            if is_mean_centred(module):
                x = x - x.mean(dim=-1, keepdim=True)
            seen[path] = float(x.pow(2).mean())
        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(hook_for(p)) for p in paths]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    headroom = InitOptions().eps_headroom
    for path in paths:
        target = headroom * norm_eps(model.get_submodule(path))
        assert target / SETTLED_FACTOR < seen[path] < target * SETTLED_FACTOR, (path, seen[path], target)


def test_a_model_without_qk_norms_records_the_step_as_not_applicable(tmp_path):
    folder = build(tmp_path, "LlamaConfig", "LlamaForCausalLM")
    manifest = json.loads((folder / "tiny_replica.json").read_text())
    text = json.dumps(manifest)
    assert '"qk_norms"' in text and "no q/k norms" in text


def test_per_head_norm_containers_are_calibrated_through_their_children(tmp_path):
    """StableLM's q/k layernorm is a list of per-head LayerNorms with no eps of its own (was exit 3)."""
    folder = build(tmp_path, "StableLmConfig", "StableLmForCausalLM", qk_layernorm=True)
    manifest = json.loads((folder / "tiny_replica.json").read_text())
    assert manifest["init"]["calibration"]["qk_norms"]["status"] == "applied"


@pytest.mark.parametrize("config_class, architecture", [("CTRLConfig", "CTRLLMHeadModel"),
                                                        ("XGLMConfig", "XGLMForCausalLM")])
def test_a_fixed_position_table_keeps_the_tokens_share(tmp_path, config_class, architecture):
    """CTRL's and XGLM's sinusoidal tables are rebuilt at load (not weights), so they alone give the first
    norm a mean square near 0.33; aiming at eps_headroom x eps drove the token embedding to x2e-9 (a
    token-blind input, final norm x8e8). The tokens now take an equal share of the first norm's input."""
    folder = build(tmp_path, config_class, architecture)
    step = json.loads((folder / "tiny_replica.json").read_text())["init"]["calibration"]["embedding"]
    floor = step["fixed_table_floor"]
    assert floor > 0 and "fixed position table" in step["note"]
    assert step["scale"] > 0.01, step
    import torch

    import hf_reference
    from replica_init import PROMPT, _first_norm_mean_square

    model = hf_reference.load(str(folder))
    from transformers import AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(folder)(PROMPT)["input_ids"]])
    with torch.no_grad():
        _, mean_square, _ = _first_norm_mean_square(model, [step["norm"]], ids)
    assert 2 * floor / SETTLED_FACTOR < mean_square < 2 * floor * SETTLED_FACTOR, (mean_square, floor)
