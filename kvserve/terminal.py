"""`kvserve generate` and `kvserve chat`: the model answering in the terminal."""
import argparse
import sys

from kvserve.args import add_engine_args, add_sampling_args, engine_config, sampling_params


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    add_engine_args(p, positional_model=False)
    add_sampling_args(p, max_tokens=128)


def cmd_generate(args) -> int:
    from kvserve.engine.engine import Engine
    from kvserve.llm import LLM
    llm = LLM(engine=Engine(engine_config(args)))
    params = sampling_params(args)
    if args.raw or not llm.tokenizer.chat_template:
        out = llm.generate(args.prompt, params, use_tqdm=False)
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0


def add_chat_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    add_sampling_args(p, max_tokens=512)
    p.add_argument("--system", default=None, help="system prompt")


def cmd_chat(args) -> int:
    from kvserve.engine.engine import Engine
    engine = Engine(engine_config(args))
    tok = engine.tokenizer
    if not tok.chat_template:
        raise ValueError(f"{args.model or 'the model'} has no chat template (a base model): chat needs one; "
                         "use `kvserve generate --raw` or the completions API")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("kvserve chat: type a message, Ctrl-D or /exit to quit, /reset to start over.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        try:
            rid = engine.add_request(prompt, sampling_params(args))
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the chat
            print(f"kvserve chat: {e}; /reset starts over", file=sys.stderr)
            messages.pop()
            continue
        shown = ""
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    text = out.outputs[0].text
                    print(text[len(shown):], end="", flush=True)
                    shown = text
        except KeyboardInterrupt:
            engine.abort(rid)
        print()
        messages.append({"role": "assistant", "content": shown})
