"""Random-weight models of a named shape: kvserve and transformers get the same weights."""
import pytest
import torch

from kvserve.model.random_weights import SHAPES, RandomWeights, shape_config, tensor_shapes, token_tokenizer


def test_weights_are_the_same_every_time_and_at_init_scale():
    a, b = RandomWeights(SHAPES["tiny"], torch.float32, "cpu"), RandomWeights(SHAPES["tiny"], torch.float32, "cpu")
    assert list(a) == list(b) and len(a) == len(tensor_shapes(SHAPES["tiny"]))
    for name in a:
        assert torch.equal(a[name], b[name])
    assert 0.015 < a["model.layers.0.mlp.down_proj.weight"].std() < 0.025
    assert 0.8 < a["model.norm.weight"].mean() < 1.2
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="unknown model shape 'llama-70b'"):
        shape_config("llama-70b")


def test_token_tokenizer_round_trips():
    tok = token_tokenizer(100)
    assert tok.vocab_size == 100
    assert tok.decode(tok.encode("<3> <99> <0>")) == "<3> <99> <0>"


def test_kvserve_and_transformers_agree_on_random_weights():
    from kvserve.bench.transformers_peer import load_transformers_model
    from kvserve.config import EngineConfig
    from kvserve.engine.engine import Engine
    from kvserve.engine.request import SamplingParams
    engine = Engine(EngineConfig(random_weights="tiny", dtype="float32", device="cpu"))
    hf = load_transformers_model(None, torch.float32, "cpu", "tiny")
    prompt = [5, 17, 300, 42, 7, 99]
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished():
        outs = engine.step()
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert outs[0].outputs[0].token_ids == ref


def test_int4_quantizes_the_linear_weights_as_a_float_checkpoint():
    """--random-weights with --quantization int4: linears int4 (the C step's), vocabulary int8,
    norms float; each quantized tensor is the float weight rounded, within half a step."""
    from kvserve.model.quant import QuantizedTensor
    plain = RandomWeights(SHAPES["tiny"], torch.float32, "cpu")
    quantized = RandomWeights(SHAPES["tiny"], torch.float32, "cpu", quantization="int4")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "model.norm.weight"):
        w, q = plain[name], quantized[name]
        if name.endswith("norm.weight"):
            assert torch.equal(q, w)
            continue
        assert isinstance(q, QuantizedTensor) and q.kind == ("int8" if "embed" in name else "int4")
        groups = w.view(w.shape[0], -1, q.group)
        step = (groups.amax(-1) - groups.amin(-1)) / 15 if q.kind == "int4" else groups.abs().amax(-1) / 127
        assert ((q.dequantize() - w).view_as(groups).abs() <= step[..., None] / 2 + 1e-6).all()
