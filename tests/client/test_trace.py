"""lm.trace(): reads, in-place edits, replacements, ad hoc calls and input forms vs raw PyTorch hooks.

Every expected value comes from the same Hugging Face model run with raw register_forward_hook /
register_forward_pre_hook (tests/client/reference.py) or from a manual computation; never from
sandbox_client itself. Each test runs directly and through the JSON wire format (`wire`).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from reference import (
    assert_same,
    attn,
    capture_inputs,
    embed,
    layer,
    mlp,
    norm,
    run_hf,
    token_ids,
)
from torch import nn

import sandbox_client as sc

PROMPT = "The Eiffel Tower is in the city of"
OTHER = "Hello world, this is a test"


def plain_logits(hf: nn.Module, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    out, _ = run_hf(hf, ids, **kwargs)
    return out.logits


def test_saved_layer_output_equals_raw_hook(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                            arch: str, wire: str) -> None:
    with lm.trace(PROMPT):
        h = layer(lm, arch, 1).output.save()
    _, (expected,) = run_hf(hf, token_ids(gpt2_tokenizer, PROMPT), capture=[layer(hf, arch, 1)])
    assert isinstance(h.value, torch.Tensor)
    assert_same(h.value, expected)


def test_value_before_block_end_raises(lm: Any, arch: str, wire: str) -> None:
    with lm.trace(PROMPT):
        h = layer(lm, arch, 0).output.save()
        with pytest.raises(sc.ValueNotReadyError):
            _ = h.value
    assert isinstance(h.value, torch.Tensor)


def test_root_output_logits_bitwise_equal_plain_forward(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                                        arch: str, wire: str) -> None:
    with lm.trace(PROMPT):
        logits = lm.output.logits.save()
    assert_same(logits.value, plain_logits(hf, token_ids(gpt2_tokenizer, PROMPT)))


def test_inplace_zero_mlp_output_equals_raw_hook(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                                 arch: str, wire: str) -> None:
    with lm.trace(PROMPT):
        mlp(lm, arch, 1).output[:] = 0
        logits = lm.output.logits.save()

    def zero(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
        out[:] = 0

    ids = token_ids(gpt2_tokenizer, PROMPT)
    expected = plain_logits(hf, ids, fwd=[(mlp(hf, arch, 1), zero)])
    assert_same(logits.value, expected)
    assert not torch.equal(expected, plain_logits(hf, ids))  # the edit matters


def test_clone_before_inplace_edit_keeps_old_values(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                                    arch: str, wire: str) -> None:
    with lm.trace(PROMPT):
        before = mlp(lm, arch, 2).output.clone().save()
        mlp(lm, arch, 2).output[:] = 0
        after = mlp(lm, arch, 2).output.save()
    _, (expected,) = run_hf(hf, token_ids(gpt2_tokenizer, PROMPT), capture=[mlp(hf, arch, 2)])
    assert_same(before.value, expected)
    assert_same(after.value, torch.zeros_like(expected))


def test_replace_mlp_output_equals_raw_hook(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                            arch: str, wire: str) -> None:
    with lm.trace(PROMPT):
        m = mlp(lm, arch, 2)
        m.output = m.output * 2
        doubled = mlp(lm, arch, 2).output.save()
        logits = lm.output.logits.save()
    ids = token_ids(gpt2_tokenizer, PROMPT)
    expected, (exp_doubled,) = run_hf(hf, ids, fwd=[(mlp(hf, arch, 2), lambda _m, _a, o: o * 2)],
                                      capture=[mlp(hf, arch, 2)])
    assert_same(doubled.value, exp_doubled)
    assert_same(logits.value, expected.logits)


def test_replace_embedding_output(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                  arch: str, wire: str) -> None:
    ids = token_ids(gpt2_tokenizer, PROMPT)
    noise = torch.randn(1, ids.shape[1], 64, generator=torch.Generator().manual_seed(1))
    with lm.trace(PROMPT):
        e = embed(lm, arch)
        e.output = e.output * 0.5 + noise
        h = layer(lm, arch, 0).output.save()
        logits = lm.output.logits.save()
    expected, (exp_h,) = run_hf(hf, ids, fwd=[(embed(hf, arch), lambda _m, _a, o: o * 0.5 + noise)],
                                capture=[layer(hf, arch, 0)])
    assert_same(h.value, exp_h)
    assert_same(logits.value, expected.logits)


def test_logit_lens_ad_hoc_call_equals_manual(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                              arch: str, wire: str) -> None:
    with lm.trace(PROMPT):
        h = layer(lm, arch, 1).output
        lens = lm.lm_head(norm(lm, arch)(h)).save()
        logits = lm.output.logits.save()
    ids = token_ids(gpt2_tokenizer, PROMPT)
    out, (hidden,) = run_hf(hf, ids, capture=[layer(hf, arch, 1)])
    with torch.no_grad():
        expected_lens = hf.lm_head(norm(hf, arch)(hidden))
    assert_same(lens.value, expected_lens)
    # the ad hoc call of the final norm / lm_head does not disturb the real forward
    assert_same(logits.value, out.logits)


def test_input_equals_pre_hook_first_arg(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                         arch: str, wire: str) -> None:
    with lm.trace(PROMPT):
        layer_in = layer(lm, arch, 2).input.save()
        mlp_in = mlp(lm, arch, 2).input.save()
    ids = token_ids(gpt2_tokenizer, PROMPT)
    args, _ = capture_inputs(hf, layer(hf, arch, 2), lambda: hf(input_ids=ids))
    mlp_args, _ = capture_inputs(hf, mlp(hf, arch, 2), lambda: hf(input_ids=ids))
    assert_same(layer_in.value, args[0])
    assert_same(mlp_in.value, mlp_args[0])


@pytest.mark.parametrize("where", ["mlp", "attn"])
def test_inputs_gives_args_and_kwargs(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                      arch: str, where: str, wire: str) -> None:
    """mlp is called as mlp(x); Llama/Qwen2 attention as self_attn(hidden_states=..., ...) (kwargs only)."""
    pick = mlp if where == "mlp" else attn
    with lm.trace(PROMPT):
        inputs = pick(lm, arch, 1).inputs.save()
    ids = token_ids(gpt2_tokenizer, PROMPT)
    args, kwargs = capture_inputs(hf, pick(hf, arch, 1), lambda: hf(input_ids=ids))
    got_args, got_kwargs = inputs.value
    if wire == "remote":   # cache objects are not results: a remote bundle carries them as None (docs/api.md)
        kwargs = {k: None if type(v).__name__.endswith("Cache") else v for k, v in kwargs.items()}
    assert_same(tuple(got_args), args)
    assert_same(dict(got_kwargs), kwargs)


def test_assign_input_equals_raw_pre_hook(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                          arch: str, wire: str) -> None:
    with lm.trace(PROMPT):
        m = mlp(lm, arch, 1)
        m.input = m.input * 0.5
        seen = mlp(lm, arch, 1).input.save()
        logits = lm.output.logits.save()
    ids = token_ids(gpt2_tokenizer, PROMPT)
    args, _ = capture_inputs(hf, mlp(hf, arch, 1), lambda: hf(input_ids=ids))
    expected = plain_logits(hf, ids, pre=[(mlp(hf, arch, 1), lambda _m, a: (a[0] * 0.5,) + a[1:])])
    assert_same(seen.value, args[0] * 0.5)
    assert_same(logits.value, expected)
    assert not torch.equal(expected, plain_logits(hf, ids))


def test_tuple_unpacking_of_attention_output(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                             arch: str, wire: str) -> None:
    with lm.trace(PROMPT):
        out, weights = attn(lm, arch, 1).output
        out.save()
        weights.save()
    _, (expected,) = run_hf(hf, token_ids(gpt2_tokenizer, PROMPT), capture=[attn(hf, arch, 1)])
    assert isinstance(expected, tuple) and len(expected) == 2
    assert_same(out.value, expected[0])
    assert_same(weights.value, expected[1])  # None under sdpa


def test_spec_example_several_edits_in_one_trace(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                                 arch: str, wire: str) -> None:
    """The SPEC's example block, scaled to 4 layers; statements deliberately not in forward order."""
    with lm.trace(PROMPT):
        h = layer(lm, arch, 3).output.save()
        mlp(lm, arch, 1).output[:] = 0
        m2 = mlp(lm, arch, 2)
        m2.output = m2.output * 2
        lens = lm.lm_head(norm(lm, arch)(h)).save()
        logits = lm.output.logits.save()

    def zero(_m: nn.Module, _a: Any, o: torch.Tensor) -> None:
        o[:] = 0

    ids = token_ids(gpt2_tokenizer, PROMPT)
    out, (exp_h,) = run_hf(hf, ids,
                           fwd=[(mlp(hf, arch, 1), zero),
                                (mlp(hf, arch, 2), lambda _m, _a, o: o * 2)],
                           capture=[layer(hf, arch, 3)])
    with torch.no_grad():
        exp_lens = hf.lm_head(norm(hf, arch)(exp_h))
    assert_same(h.value, exp_h)
    assert_same(lens.value, exp_lens)
    assert_same(logits.value, out.logits)


# ---- input forms -----------------------------------------------------------------------------------

def _ids(tok: Any, prompt: str) -> list[int]:
    return list(token_ids(tok, prompt)[0].tolist())


@pytest.mark.parametrize("form", ["str", "list_int", "tensor_1d", "tensor_2d"])
def test_single_row_input_forms_bitwise(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                        arch: str, form: str, wire: str) -> None:
    ids = _ids(gpt2_tokenizer, PROMPT)
    given: Any = {
        "str": PROMPT,
        "list_int": ids,
        "tensor_1d": torch.tensor(ids),
        "tensor_2d": torch.tensor([ids]),
    }[form]
    with lm.trace(given):
        logits = lm.output.logits.save()
    assert_same(logits.value, plain_logits(hf, torch.tensor([ids])))


@pytest.mark.parametrize("form", ["list_str", "list_list_int", "tensor_2d", "dict"])
def test_two_row_input_forms(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                             arch: str, form: str, wire: str) -> None:
    """Two prompts of the same token length: no padding; compared with hf on the same [2, n] batch."""
    a, b = "The cat sat on the mat", "A dog ran in the park"
    ia, ib = _ids(gpt2_tokenizer, a), _ids(gpt2_tokenizer, b)
    assert len(ia) == len(ib), "test prompts must tokenize to the same length"
    batch = torch.tensor([ia, ib])
    given: Any = {
        "list_str": [a, b],
        "list_list_int": [ia, ib],
        "tensor_2d": batch,
        "dict": {"input_ids": batch, "attention_mask": torch.ones_like(batch)},
    }[form]
    with lm.trace(given):
        logits = lm.output.logits.save()
    expected = plain_logits(hf, batch, attention_mask=torch.ones_like(batch))
    assert_same(logits.value, expected, exact=False, atol=1e-5)
    # and each row agrees with that prompt run alone
    for row, ids in enumerate((ia, ib)):
        alone = plain_logits(hf, torch.tensor([ids]))
        assert_same(logits.value[row:row + 1], alone, exact=False, atol=1e-5)


def test_dict_input_single_row(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                               arch: str, wire: str) -> None:
    ids = token_ids(gpt2_tokenizer, PROMPT)
    with lm.trace({"input_ids": ids}):
        logits = lm.output.logits.save()
    with lm.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
        logits_mask = lm.output.logits.save()
    assert_same(logits.value, plain_logits(hf, ids))
    expected_mask = plain_logits(hf, ids, attention_mask=torch.ones_like(ids))
    assert_same(logits_mask.value, expected_mask, exact=False, atol=1e-5)


def test_no_hooks_remain_after_trace(lm: Any, hf: nn.Module, arch: str, wire: str) -> None:
    with lm.trace(OTHER):
        mlp(lm, arch, 1).output[:] = 0
        layer(lm, arch, 2).output.save()
    for name, module in hf.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
