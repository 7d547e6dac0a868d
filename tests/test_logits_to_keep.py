"""The decoder's ``logits_to_keep`` input (runtime/contract.py): the LM head runs only on the last
k positions (0 = all), the runtime asks for 1 in prefill and decode, and a decoder exported
before the input existed (every position's logits) still runs through the same runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from exporters.decoder import export_decoder, run_decoder
from runtime.contract import LOGITS_TO_KEEP, ContractError, PromptTable
from runtime.engines import DecoderEngine, decoder_contract, open_session
from runtime.runner import OrtRunner

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def engines(nano_model, tmp_path_factory) -> dict[str, Path]:
    """The fp32 nano decoder as exported now, and the same graph as an engine exported before
    ``logits_to_keep``: the input removed and the LM head fed every position again."""
    d = tmp_path_factory.mktemp("keep")
    new = export_decoder(nano_model, d / "decoder.onnx", plan="fp32").onnx_path
    m = onnx.load(str(new), load_external_data=False)  # weights stay in decoder.onnx.data
    m.graph.input.remove(next(i for i in m.graph.input if i.name == LOGITS_TO_KEEP))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64),
                                                            LOGITS_TO_KEEP))
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    old = d / "decoder_old.onnx"
    onnx.save(m, str(old))
    return {"new": new, "old": old}


def _ids(cfg, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.image_start_id, (1, n))


def test_graph_keeps_the_last_positions(engines, nano_model):
    """k = 0 is every position, k = 1..S the last k, k > S all; the KV is the same for all k."""
    cfg = nano_model.cfg
    sess = open_session(engines["new"], CPU, 2)
    assert decoder_contract(sess).logits_to_keep
    ids = _ids(cfg, 11, 0)
    full, kv_full = run_decoder(sess, ids, logits_to_keep=0)
    assert full.shape == (1, 11, cfg.vocab_size)
    for k in (1, 3, 11, 40):
        got, kv = run_decoder(sess, ids, logits_to_keep=k)
        assert got.shape == (1, min(k, 11), cfg.vocab_size)
        np.testing.assert_allclose(got, full[:, -min(k, 11):], atol=1e-5)
        for (a, b), (c, e) in zip(kv, kv_full):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, e)
    with pytest.raises(ContractError, match="logits_to_keep"):
        run_decoder(sess, ids, logits_to_keep=-1)


def test_runtime_prefill_returns_last_position_only(engines, nano_model):
    """The runtime's prefill binds a [B, 1, V] logits buffer on an engine with the input (the
    [B, S, V] buffer of every position is gone) and returns the same last row; ``last_only=False``
    (validation's teacher-forced stage) still gets every position."""
    cfg = nano_model.cfg
    eng = DecoderEngine(engines["new"], CPU, 2)
    ids = _ids(cfg, 13, 1)
    c_all, c_last = eng.new_cache(1, 20), eng.new_cache(1, 20)
    every = eng.forward(c_all, ids, last_only=False)
    last = eng.forward(c_last, ids)
    assert every.shape == (1, 13, cfg.vocab_size) and last.shape == (1, cfg.vocab_size)
    np.testing.assert_allclose(last, every[:, -1], atol=1e-5)
    assert last.base is not None and last.base.shape == (1, 1, cfg.vocab_size)
    step = eng.forward(c_last, np.array([[5]]))
    np.testing.assert_allclose(step, eng.forward(c_all, np.array([[5]])), atol=1e-5)
    np.testing.assert_allclose(last, every[:, -1], atol=1e-5)  # still valid after a step


def test_engine_without_the_input_still_runs(engines, nano_model):
    """An old engine (no ``logits_to_keep``) is read as such through the contract; the runtime
    feeds it nothing extra and gets the new engine's logits, last row and all rows alike."""
    cfg = nano_model.cfg
    new, old = (DecoderEngine(engines[k], CPU, 2) for k in ("new", "old"))
    assert new.contract.logits_to_keep and not old.contract.logits_to_keep
    assert LOGITS_TO_KEEP not in [n for n, _, _ in old.contract.input_specs()]
    assert old.contract.logits_feed(1) == {}
    ids = _ids(cfg, 9, 2)
    outs = {}
    for name, e in (("new", new), ("old", old)):
        c = e.new_cache(1, 16)
        outs[name] = [e.forward(c, ids), e.forward(c, np.array([[7]])).copy(),
                      e.forward(e.new_cache(1, 16), ids, last_only=False)]
    for a, b in zip(outs["new"], outs["old"]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5)
    full, _ = run_decoder(open_session(engines["old"], CPU, 2), ids, logits_to_keep=1)
    assert full.shape == (1, 9, cfg.vocab_size)  # the old graph ignores what it does not take


def test_validation_runner_reads_every_position(engines, nano_model):
    """Validation's runner (teacher-forced decoder stage) gets every prompt position's logits
    from an engine with the input, as from an old one."""
    cfg = nano_model.cfg
    table = PromptTable.from_config(cfg)
    ids = _ids(cfg, 10, 3)[0].tolist()
    got = [OrtRunner(None, DecoderEngine(engines[k], CPU, 2), table).prefill(ids, None)
           for k in ("new", "old")]
    assert got[0].shape == got[1].shape == (10, cfg.vocab_size)
    np.testing.assert_allclose(got[0], got[1], atol=1e-5)
