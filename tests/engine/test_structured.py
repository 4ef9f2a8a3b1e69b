"""Structured outputs in the engine, on the tiny random model: its tokens are arbitrary, which is
what stresses the grammar (every token it would pick is likely invalid JSON)."""
import json
import re

import jsonschema
import pytest

from kvserve.bench.schemas import SCHEMAS
from kvserve.engine.request import SamplingParams
from kvserve.engine.structured import StructuredOutputs
from kvserve.llm import LLM

PROMPTS = ["Give me JSON:", "Hello there", "1 2 3", "The weather today"]


@pytest.fixture
def llm(make_engine):
    return LLM(engine=make_engine())


def _run(llm, prompts, params):
    return [o.outputs for o in llm.generate(prompts, params, use_tqdm=False)]


def _valid(text: str, schema: dict) -> None:
    # the format checker's "time" wants no offset, while RFC 3339's (and xgrammar's) requires one
    checker = jsonschema.FormatChecker([f for f in jsonschema.FormatChecker.checkers if f != "time"])
    jsonschema.validate(json.loads(text), schema, format_checker=checker)


def test_corpus_is_large_and_varied():
    assert len(SCHEMAS) >= 30
    text = json.dumps(SCHEMAS)
    for feature in ("anyOf", "oneOf", "enum", "pattern", "format", "minItems", "maxItems", "minimum",
                    "additionalProperties", "$ref", "const"):
        assert feature in text, feature


def test_every_schema_of_the_corpus_validates_greedy_and_sampled_in_a_mixed_batch(llm):
    prompts, params = [], []
    for i, schema in enumerate(SCHEMAS):
        for temperature in (0.0, 1.0):
            prompts.append(PROMPTS[i % len(PROMPTS)])
            params.append(SamplingParams(temperature=temperature, max_tokens=96, seed=i,  # reproducible in CI
                                         structured=StructuredOutputs(json=schema)))
        prompts.append(PROMPTS[i % len(PROMPTS)])  # an unconstrained row between them
        params.append(SamplingParams(temperature=0.0, max_tokens=8))
    outs = _run(llm, prompts, params)
    for k, (out, p) in enumerate(zip(outs, params)):
        if p.structured is None:
            continue
        o = out[0]
        assert o.finish_reason == "stop", (k, o.text)
        _valid(o.text, p.structured.json)


def test_json_object_regex_choice_and_ebnf_match(llm):
    specs = [StructuredOutputs(json_object=True), StructuredOutputs(regex=r"[a-c]{2,5}-\d{2}"),
             StructuredOutputs(choice=["yes", "no", 'maybe "so"', "ünï"]),
             StructuredOutputs(grammar='root ::= "(" [0-9] ("+" [0-9])? ")"')]
    params = [SamplingParams(temperature=t, seed=1, max_tokens=200, structured=s) for s in specs for t in (0, 1)]
    outs = _run(llm, ["Hi"] * len(params), params)
    texts = [o[0].text for o in outs]
    for text, p in zip(texts, params):
        spec = p.structured
        if spec.kind == "json_object":
            assert outs[params.index(p)][0].finish_reason in ("stop", "length")
            if outs[params.index(p)][0].finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
        elif spec.kind == "regex":
            assert re.fullmatch(spec.regex, text), text
        elif spec.kind == "choice":
            assert text in spec.choice
        else:
            assert re.fullmatch(r"\([0-9](\+[0-9])?\)", text), text


def test_a_constrained_row_does_not_change_unconstrained_greedy_tokens(llm):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = _run(llm, PROMPTS, [plain] * len(PROMPTS))
    constrained = SamplingParams(temperature=0, max_tokens=40, structured={"json": SCHEMAS[0]})
    mixed = _run(llm, PROMPTS + ["JSON please"] * 3, [plain] * len(PROMPTS) + [constrained] * 3)
    assert [o[0].token_ids for o in mixed[:len(PROMPTS)]] == [o[0].token_ids for o in alone]
    for o in mixed[len(PROMPTS):]:
        _valid(o[0].text, SCHEMAS[0])


def test_n_forks_each_child_its_own_matcher(llm):
    schema = SCHEMAS[19]  # nested
    out = _run(llm, ["Go"], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=96,
                                           structured={"json": schema}))[0]
    assert len(out) == 4 and len({o.text for o in out}) > 1
    for o in out:
        assert o.finish_reason == "stop"
        _valid(o.text, schema)


def test_preemption_and_recompute_keep_matcher_state(make_engine):
    """A pool so small that sequences are preempted and recomputed mid-output: the matcher, which
    followed the accepted tokens, is still right, and greedy outputs equal a roomy run's."""
    params = [SamplingParams(temperature=0, max_tokens=96, structured={"json": s}) for s in SCHEMAS[:4]]
    prompts = [f"Record number {i}: " + "x " * 20 for i in range(len(params))]
    roomy = _run(LLM(engine=make_engine()), prompts, params)
    tight_engine = make_engine(num_pages=16, page_size=8)  # one request alone fits (128 tokens), four do not
    preempted = []
    original = tight_engine.scheduler.preempt
    tight_engine.scheduler.preempt = lambda seq: (preempted.append(seq.seq_id), original(seq))
    tight = _run(LLM(engine=tight_engine), prompts, params)
    assert preempted, "the pool was not tight enough to preempt"
    assert [o[0].text for o in tight] == [o[0].text for o in roomy]
    for o, schema in zip(tight, SCHEMAS):
        _valid(o[0].text, schema)


def test_stop_string_abort_and_length(make_engine):
    engine = make_engine()
    schema = SCHEMAS[0]
    stop = engine.add_request("a", SamplingParams(temperature=0, max_tokens=64, stop=['"age"'],
                                                  structured={"json": schema}))
    short = engine.add_request("b", SamplingParams(temperature=0, max_tokens=3, structured={"json": schema}))
    gone = engine.add_request("c", SamplingParams(temperature=0, max_tokens=64, structured={"json": schema}))
    other = engine.add_request("d", SamplingParams(temperature=0, max_tokens=64, structured={"json": schema}))
    done, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            if out.finished:
                done[out.request_id] = out.outputs[0]
        steps += 1
        if steps == 2:
            engine.abort(gone)
    assert done[stop].finish_reason == "stop" and '"age"' not in done[stop].text
    assert done[stop].text.startswith('{"name": ')
    assert done[short].finish_reason == "length" and len(done[short].token_ids) == 3
    assert gone not in done
    _valid(done[other].text, schema)


def test_compile_once_per_spec_bad_specs_and_time_limit(make_engine):
    engine = make_engine()
    good = SamplingParams(temperature=0, max_tokens=64, structured={"json": SCHEMAS[2]})
    for _ in range(3):
        engine.add_request("hi", good)
    assert engine.grammars.compiles == 1
    bad = [({"regex": "(ab"}, "parenthesis"), ({"grammar": "root ::= foo"}, "foo"),
           ({"json": {"type": "nope"}}, "nope"), ({"json": "{not json"}, "not valid JSON"),
           ({"choice": []}, "non-empty"), ({"regex": "a", "choice": ["a"]}, "exactly one")]
    for spec, words in bad:
        with pytest.raises(ValueError, match=re.escape(words)):
            engine.add_request("hi", SamplingParams(max_tokens=8, structured=spec))
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured={"json_object": True})
    engine.grammars.timeout_s = 0.001
    huge = {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": f"[a-z]{{2,30}}{i}"}
                                             for i in range(40)}}
    with pytest.raises(ValueError, match="took longer"):
        engine.add_request("hi", SamplingParams(max_tokens=8, structured={"json": huge}))
    engine.grammars.timeout_s = 5.0
    while engine.has_unfinished():  # the good requests still complete
        for out in engine.step():
            assert out.error is None
            if out.finished:
                _valid(out.outputs[0].text, SCHEMAS[2])


def test_offline_chat_with_tools(llm):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"],
        "additionalProperties": False}}}
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    prompt = llm.tokenizer.decode(llm._chat_prompt(messages, True, [tool]), skip_special_tokens=False)
    assert "get_weather" in prompt and prompt.index("get_weather") < prompt.index("Weather in Oslo?")
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=32, structured={"json": tool["function"][
        "parameters"]}), use_tqdm=False, tools=[tool])[0].outputs[0]
    assert json.loads(out.text)["city"] in ("Oslo", "Rome")


def test_a_timed_out_compile_still_lands_in_the_cache_and_frees_its_slot(make_engine):
    import time
    grammars = make_engine().grammars
    grammars.timeout_s, grammars.max_pending = 0.0001, 1
    spec = StructuredOutputs(json={"type": "object", "properties": {
        f"k{i}": {"type": "string", "pattern": f"[a-z]{{2,20}}{i}"} for i in range(12)}})
    with pytest.raises(ValueError, match="took longer"):
        grammars.compile(spec)
    deadline = time.monotonic() + 30
    while grammars._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not grammars._pending
    grammars.timeout_s = 5.0
    compiles = grammars.compiles
    grammars.compile(spec)
    grammars.compile(StructuredOutputs(regex="a+"))
    assert grammars.compiles == compiles + 1  # the first was a hit


def test_bitmask_paths_agree_for_any_dtype_and_padded_logits(make_engine, monkeypatch):
    """The C kernel and xgrammar's (CPU float32) and the torch unpacking (other dtypes, GPUs) mask
    the same tokens; logits wider than the vocabulary get their padding masked."""
    import torch
    from kvserve.engine import structured
    from kvserve.engine.structured import BitmaskApplier
    engine = make_engine()
    vocab = engine.model.config.vocab_size
    specs = [StructuredOutputs(json=SCHEMAS[0]), StructuredOutputs(regex="[0-9]+"), StructuredOutputs(choice=["a"])]
    base = torch.randn(4, vocab + 64)
    masked = {}
    for dtype, width, kernel in ((torch.float32, vocab, "native"), (torch.float32, vocab, "xgrammar"),
                                 (torch.bfloat16, vocab, "torch"), (torch.float32, vocab + 64, "native")):
        if kernel == "xgrammar":
            monkeypatch.setattr(structured, "apply_token_bitmask", lambda *args: False)
        logits = base[:, :width].to(dtype).contiguous()
        BitmaskApplier(vocab, engine.grammars.json_safe).apply(
            logits, [0, 2, 3], [engine.grammars.matcher(s) for s in specs])
        monkeypatch.undo()
        assert torch.isinf(logits[[0, 2, 3], vocab:]).all() and not torch.isinf(logits[1]).any()
        masked[dtype, width, kernel] = torch.isinf(logits[:, :vocab])
    first = masked[torch.float32, vocab, "native"]
    assert all(torch.equal(m, first) for m in masked.values())
    digits = [engine.tokenizer.token_to_id(str(d)) for d in range(10)]
    assert not first[2, digits].any() and first[2].sum() > vocab - 2000


def test_masks_filled_ahead_equal_those_filled_late_json_safe_included(make_engine):
    """Inside a JSON string xgrammar allows control characters, which strict JSON forbids: the rows
    filled on the worker thread during the forward get the json_safe row as those filled at sampling."""
    import torch
    from kvserve.engine.structured import BitmaskApplier
    engine = make_engine()
    vocab, grammars = engine.model.config.vocab_size, engine.grammars
    spec = StructuredOutputs(json={"type": "object", "properties": {"a": {"type": "string"}}})

    def in_string():
        c = grammars.matcher(spec)
        assert all(c.accept_token(t) for t in engine.tokenizer.encode('{"a": "x', add_special_tokens=False))
        return c

    def masked(applier, ahead):
        logits, constraints = torch.zeros(3, vocab), [in_string(), in_string()]
        if ahead:
            applier.fill_ahead(constraints)
        applier.apply(logits, [0, 2], constraints)
        return torch.isinf(logits)
    late = masked(BitmaskApplier(vocab, grammars.json_safe), ahead=False)
    assert torch.equal(masked(BitmaskApplier(vocab, grammars.json_safe), ahead=True), late)
    unsafe = masked(BitmaskApplier(vocab), ahead=False)  # xgrammar's mask alone
    assert (late[0] & ~unsafe[0]).any() and not late[1].any()  # json_safe masked more


def test_native_bitmask_kernel_equals_xgrammar_s_on_random_masks():
    """Words all set, all clear and mixed, a vocabulary that is no multiple of 32, strided logits."""
    import torch
    import xgrammar as xgr
    from kvserve.native.token_bitmask import apply_token_bitmask
    g = torch.Generator().manual_seed(0)
    vocab = 1000 + 17
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, -(-vocab // 32)), dtype=torch.int32, generator=g)
    bitmask[:, ::3], bitmask[:, 1::5] = 0, -1
    logits = torch.randn(6, vocab + 40, generator=g)[:, :vocab + 9]  # wider than the vocabulary, row stride 1057
    expected = logits.contiguous()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab, indices=[0, 3, 5])
    if not apply_token_bitmask(logits, bitmask, [0, 3, 5], vocab):
        pytest.skip("no C compiler here")
    assert torch.equal(logits, expected) and torch.isinf(logits).any() and not torch.isinf(logits[1]).any()


def test_native_bitmask_kernel_reads_other_mask_rows_and_ands_a_row_where_asked():
    """Logits row r masked by bitmask row mask_rows[i], and by and_mask too where also[i]: the same
    as xgrammar's kernel over a bitmask built row by row with torch."""
    import torch
    import xgrammar as xgr
    from kvserve.native.token_bitmask import apply_token_bitmask
    g = torch.Generator().manual_seed(1)
    vocab = 700 + 5
    words = -(-vocab // 32)
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, words), dtype=torch.int32, generator=g)
    bitmask[1, ::2] = -1
    safe = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, generator=g)
    rows, mask_rows, also = [4, 0, 2], [1, 3, 1], [True, False, False]
    logits = torch.randn(5, vocab, generator=g)
    expected, full = logits.clone(), torch.full((5, words), -1, dtype=torch.int32)
    for r, m, a in zip(rows, mask_rows, also):
        full[r] = bitmask[m] & safe if a else bitmask[m]
    xgr.apply_token_bitmask_inplace(expected, full, vocab_size=vocab, indices=rows)
    if not apply_token_bitmask(logits, bitmask, rows, vocab, mask_rows, safe, also):
        pytest.skip("no C compiler here")
    assert torch.equal(logits, expected) and not torch.isinf(logits[[1, 3]]).any()
    assert torch.isinf(logits[4]).sum() > torch.isinf(logits[2]).sum()  # the same mask row, ANDed more


def test_formats_xgrammar_admits_too_much_of_are_exact_patterns():
    """xgrammar's own ipv4 takes leading zeros and its date any day up to 31 (both seen sampled
    from the tiny model); the patterns that replace them agree with jsonschema's checker."""
    from kvserve.engine.json_schema import STRICT_FORMATS as _STRICT_FORMATS, for_xgrammar as _strict_formats
    schema = {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"},
                                                "days": {"type": "array", "items": {"format": "date"}}}}
    strict = _strict_formats(schema)
    assert "format" not in json.dumps(strict) and schema["properties"]["ip"]["format"] == "ipv4"
    checker = jsonschema.FormatChecker()
    for fmt, values in {"ipv4": ["1.2.3.4", "255.255.255.255", "0.0.0.0", "255.035.45.91", "256.1.1.1", "1.2.3"],
                        "date": ["2024-01-31", "2024-04-30", "0001-02-28", "9077-09-31", "2023-02-30",
                                 "0000-01-01", "2024-13-01"]}.items():
        for value in values:
            assert bool(re.fullmatch(_STRICT_FORMATS[fmt].strip("^$"), value)) == checker.conforms(value, fmt), value


def test_time_formats_bound_the_fraction_and_keep_rfc3339_s_ranges():
    """xgrammar's "time" lets a greedy model repeat fraction digits until max_tokens (seen with
    SmolLM2); the pattern that replaces it takes at most 9, and agrees with Python's ISO parser on
    the fields' ranges for RFC 3339 shaped values (the parser also takes forms RFC 3339 does not)."""
    import datetime
    from kvserve.engine.json_schema import STRICT_FORMATS as _STRICT_FORMATS

    def iso(value, parse):
        try:
            parse(value)
            return True
        except ValueError:
            return False
    times = ["20:20:20Z", "00:00:00+05:30", "23:59:59.123456-11:00", "24:00:00Z", "12:60:00Z", "12:00:61Z",
             "12:00:00+24:00", "1:00:00Z"]
    for value in times:
        assert bool(re.fullmatch(_STRICT_FORMATS["time"].strip("^$"), value)) == iso(value, datetime.time.fromisoformat)
        stamp = "2024-02-28T" + value
        assert bool(re.fullmatch(_STRICT_FORMATS["date-time"].strip("^$"), stamp)) == \
            iso(stamp, datetime.datetime.fromisoformat), stamp
    assert re.fullmatch(_STRICT_FORMATS["time"].strip("^$"), "20:20:20.123456789Z")
    assert not re.fullmatch(_STRICT_FORMATS["time"].strip("^$"), "20:20:20.1234567890Z")
    assert not re.fullmatch(_STRICT_FORMATS["time"].strip("^$"), "20:20:20")  # RFC 3339 wants an offset


def test_xgrammar_enforces_each_strict_format_as_python_s_re_reads_it(make_engine):
    """The patterns go through xgrammar's regex reader, which misread an optional group before a
    suffix (0.2.9): what the compiled grammar accepts must be what re.fullmatch accepts."""
    from kvserve.engine.json_schema import STRICT_FORMATS as _STRICT_FORMATS
    grammars = make_engine().grammars
    values = {"ipv4": ["1.2.3.4", "01.2.3.4", "1x2.3.4", "255.255.255.255", "256.1.1.1"],
              "date": ["2024-01-31", "2024-02-30", "2024-1-01", "2024x01-01"],
              "time": ["20:20:20Z", "20:20:2023-01:00", "20:20:20.123456789Z", "20:20:20.1234567890Z",
                       "20:20:20.5+05:30", "20:20:20", "20:20:20x5Z"],
              "date-time": ["2024-01-31T20:20:20Z", "2024-01-31T20:20:2023-01:00", "2024-01-31 20:20:20Z"]}
    for fmt, cases in values.items():
        spec = StructuredOutputs(json={"type": "string", "format": fmt})
        for value in cases:
            c = grammars.matcher(spec)
            took = c.matcher.accept_string(json.dumps(value)) and c.matcher.is_completed()
            assert took == bool(re.fullmatch(_STRICT_FORMATS[fmt].strip("^$"), value)), (fmt, value)
