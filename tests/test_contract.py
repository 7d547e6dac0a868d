"""The engine contract (runtime/contract.py): the prompt-table rule and the decoder's I/O, said
once and read back the same from a config, a graph's inputs/outputs and a manifest."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from runtime.contract import ContractError, DecoderIO, PromptTable, VisionIO

V, S, E, P = 100, 90, 91, 92  # vocab_size, <img>, </img>, <imgpad>


def test_table_ids_address_feature_rows_in_prompt_order():
    t = PromptTable(V, S, E, P, 3)
    ids = [1, S, P, P, P, E, 2, S, P, P, P, E, 3]
    out, used = t.table_ids(ids)
    assert used == [0, 1]
    assert out.tolist() == [1, S, 100, 101, 102, E, 2, S, 103, 104, 105, E, 3]
    assert out.dtype == np.int64 and ids[2] == P  # the input is not modified


def test_table_ids_after_a_cached_prefix_and_in_a_batch():
    t = PromptTable(V, S, E, P, 2)
    ids = [S, P, P, E, 7, S, P, P, E, 8]
    # the first image is already in the KV cache: only the second one needs features
    out, used = t.table_ids(ids, start=4)
    assert used == [1] and out.tolist() == [7, S, 100, 101, E, 8]
    # a start inside a span keeps the span's own rows
    out, used = t.table_ids(ids, start=2)
    assert used == [0, 1] and out.tolist() == [101, E, 7, S, 102, 103, E, 8]
    # a later request of a batch addresses rows behind the earlier requests' images
    out, _ = t.table_ids(ids, first_row=4)
    assert out[[1, 2, 6, 7]].tolist() == [104, 105, 106, 107]


@pytest.mark.parametrize("ids,what", [([S, P, P], "never closed"), ([P, E], "without <img>"),
                                      ([S, S, E], "before the </img>")])
def test_unbalanced_tags_are_refused(ids, what):
    with pytest.raises(ContractError, match=what):
        PromptTable(V, S, E, P, 2).table_ids(ids)


def test_a_span_of_the_wrong_length_is_refused():
    with pytest.raises(ContractError, match="span of 1 slots, the vision engine makes 2"):
        PromptTable(V, S, E, P, 2).table_ids([S, P, E])


def _cfg(kv_layers=3):
    return SimpleNamespace(num_hidden_layers=kv_layers, num_attention_heads=4, head_dim=8,
                           hidden_size=32, vocab_size=V, image_start_id=S,
                           visual=SimpleNamespace(n_queries=2, image_size=28, output_dim=32))


def test_decoder_io_from_config_equals_what_its_graph_io_says():
    io = DecoderIO.from_config(_cfg(), "fp16")
    ins = {n: (np.dtype(d), shape) for n, d, shape in io.input_specs()}
    outs = {n: (np.dtype(d), shape) for n, d, shape in io.output_specs()}
    assert list(ins)[:3] == ["input_ids", "image_embeds", "attention_mask"]
    assert list(ins)[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert list(outs)[:3] == ["logits", "present.0.key", "present.0.value"]
    assert ins["past_key_values.2.value"] == (np.dtype(np.float16),
                                              ["batch", 4, "past_sequence_length", 8])
    assert outs["logits"] == (np.dtype(np.float32), ["batch", "kept_length", V])
    assert ins["logits_to_keep"] == (np.dtype(np.int64), [1]) and io.logits_to_keep
    assert DecoderIO.from_io(ins, outs) == io
    # an engine exported before logits_to_keep: every position's logits, nothing extra fed
    old_ins = {n: v for n, v in ins.items() if n != "logits_to_keep"}
    old = DecoderIO.from_io(old_ins, outs)
    assert not old.logits_to_keep and old.logits_feed(1) == {} and old.logits_rows(7, 1) == 7
    assert io.logits_rows(7, 1) == 1 and io.logits_rows(7, 0) == 7 and io.logits_rows(3, 5) == 3
    assert io.logits_feed(1)["logits_to_keep"].tolist() == [1]
    assert io.kv_bytes_per_token == 2 * 3 * 4 * 8 * 2 and io.kv_elements(2, 5) == 2 * 4 * 5 * 8
    assert DecoderIO.from_config(_cfg(), "fp32").kv_dtype == "float32"
    with pytest.raises(ContractError, match="not a decoder"):
        DecoderIO.from_io({"pixel_values": (np.float32, [1])}, outs)


def test_padding_contract():
    """``unpadded`` engines (GroupQueryAttention without a bias): each row's real tokens first and
    without gaps; ``masked`` engines take any mask; unpadded needs the shared KV layout."""
    io = DecoderIO.from_config(_cfg(), "fp16", "shared", "unpadded")
    assert not io.masks_keys and DecoderIO.from_config(_cfg(), "fp16").masks_keys
    io.check_mask(np.array([[1, 1, 1], [1, 1, 0]]), 0)  # a finished row ends in a pad
    io.check_mask(np.array([[1, 1, 1, 1], [1, 1, 0, 0]]), 3)
    for mask, past in (([[1, 1, 1], [0, 1, 1]], 0), ([[1, 1, 1, 1], [1, 1, 0, 1]], 3),
                       ([[1, 0, 1]], 2)):
        with pytest.raises(ContractError, match="unpadded rows only"):
            io.check_mask(np.array(mask), past)
    DecoderIO.from_config(_cfg(), "fp16").check_mask(np.array([[0, 1, 1]]), 0)
    with pytest.raises(ContractError, match="shared KV layout"):
        DecoderIO.from_config(_cfg(), "fp16", "concat", "unpadded")
    with pytest.raises(ContractError, match="padding must be"):
        DecoderIO.from_config(_cfg(), "fp16", "shared", "left")


def test_prompt_table_and_vision_io_from_config_and_manifest_agree():
    cfg = _cfg()
    model = {"vocab_size": V, "n_queries": 2, "image_size": 28, "hidden": 32,
             "special_ids": {"img_start": S, "img_end": E, "img_pad": P}}
    assert PromptTable.from_config(cfg) == PromptTable.from_manifest(model)
    assert VisionIO.from_config(cfg) == VisionIO.from_manifest(model)
    assert VisionIO.from_config(cfg).output_spec() == ("image_embeds", "float32",
                                                       ["batch", 2, 32])
