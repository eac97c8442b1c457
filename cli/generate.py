"""`dsv4 generate`: stream a completion of a raw prompt (BOS added) to the terminal."""
from __future__ import annotations

import sys

import click

from .common import (configure_threads, generation_defaults, many_small_pages, model_option,
                     load_model, note_first_compile, numerics_from, pages_line, runtime_options,
                     weights_options)


@click.command()
@model_option
@click.option("--prompt", "-p", default=None,
              help="Prompt text; read from stdin when omitted (raw text, BOS is added).")
@click.option("--max-tokens", "-n", type=click.IntRange(min=0), default=128, show_default=True,
              help="Most tokens to generate.")
@click.option("--temperature", type=click.FloatRange(min=0), default=None,
              help="Sampling temperature; 0 = greedy (default: the checkpoint's "
                   "generation_config.json, else 0.6).")
@click.option("--top-k", type=click.IntRange(min=0), default=None,
              help="Keep the k most likely tokens (0 = off).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help="Nucleus sampling: keep the smallest set with this probability mass.")
@click.option("--greedy", is_flag=True, help="Same as --temperature 0.")
@click.option("--seed", type=int, default=None, help="Random seed (runs repeat exactly).")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--ctx", type=click.IntRange(min=1), default=None,
              help="Context length to allocate (default: prompt + --max-tokens).")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens per forward pass.")
@click.option("--quiet", "-q", is_flag=True, help="No statistics line at the end.")
@click.option("--chat", is_flag=True,
              help="Chat in the V4 prompt format (interactive when stdin is a terminal).")
@click.option("--system", default=None, help="With --chat: the system prompt.")
@click.option("--thinking/--no-thinking", default=False, show_default=True,
              help="With --chat: thinking mode (reasoning first, shown apart) or chat mode.")
@click.option("--reasoning-effort", type=click.Choice(["high", "max"]), default=None,
              help="With --chat --thinking: 'max' adds the maximum-effort preamble.")
@click.option("--messages", "messages_file", type=click.Path(dir_okay=False), default=None,
              help="With --chat: a JSON file with an OpenAI-style message list (or "
                   "{\"messages\": [...], \"tools\": [...]}) to continue.")
@click.option("--interactive", "-i", is_flag=True,
              help="With --chat: read user turns from stdin line by line even when it is "
                   "not a terminal.")
@weights_options
@runtime_options
def generate(model, prompt, max_tokens, temperature, top_k, top_p, greedy, seed, stop, ctx,
             prefill_chunk, quiet, chat, system, thinking, reasoning_effort, messages_file,
             interactive, reload_pages, no_mmap, threads, threading, backend, exact, revision):
    """Generate text from a raw prompt and stream it to stdout.

    With --chat, the prompt is a user message in the V4 chat format; reasoning (thinking
    mode) is shown apart from the answer and tool calls are printed as JSON. Without
    --prompt or --messages, a terminal on stdin starts an interactive chat (/reset,
    /exit). Statistics (prompt and generation tokens/s) go to stderr.
    """
    from dsv4.runtime.errors import DsvError  # noqa: PLC0415
    from dsv4.runtime.generate import GenerationConfig, GenerationStats  # noqa: PLC0415
    from dsv4.runtime.generate import generate as run  # noqa: PLC0415
    from dsv4.runtime.model_store import resolve_model  # noqa: PLC0415
    from dsv4.runtime.sampler import SamplingParams  # noqa: PLC0415
    from dsv4.runtime.threads import set_threads  # noqa: PLC0415
    from dsv4.runtime.tokenizer import Tokenizer  # noqa: PLC0415

    chat_only = {"--system": system, "--thinking": thinking or None,
                 "--reasoning-effort": reasoning_effort, "--messages": messages_file,
                 "--interactive": interactive or None}
    if not chat and any(v is not None for v in chat_only.values()):
        used = [k for k, v in chat_only.items() if v is not None]
        raise DsvError(f"{', '.join(used)} needs --chat")
    interactive = interactive or (chat and prompt is None and messages_file is None
                                  and sys.stdin.isatty())
    if prompt is None and not interactive and not messages_file:
        if sys.stdin.isatty():
            raise DsvError("no prompt: pass --prompt TEXT or pipe text on stdin")
        prompt = sys.stdin.read()
    n_threads = configure_threads(threads, threading)
    folder = resolve_model(model, progress=sys.stderr.isatty())
    note_first_compile(backend)
    m = load_model(folder, numerics_from(exact, revision), backend, reload_pages, no_mmap, warm=True)
    set_threads(n_threads)                # Numba is imported by now: its pool takes the limit too
    tok = Tokenizer.load(folder, m.cfg.vocab_size, m.cfg.bos_token_id, m.cfg.eos_token_id)

    defaults = {"temperature": 0.6, **generation_defaults(folder)}
    sampling = SamplingParams(
        temperature=0.0 if greedy else (temperature if temperature is not None
                                        else defaults["temperature"]),
        top_k=top_k if top_k is not None else defaults.get("top_k", 0),
        top_p=top_p if top_p is not None else defaults.get("top_p", 1.0))
    gen = GenerationConfig(max_tokens=max_tokens, sampling=sampling, seed=seed, stop=tuple(stop),
                           prefill_chunk=prefill_chunk)
    if chat:
        from .chat import interactive as chat_loop, run_turn  # noqa: PLC0415
        from dsv4.runtime.chat_session import ChatOptions, ChatSession, load_messages  # noqa: PLC0415
        msgs, tools = load_messages(messages_file) if messages_file else ([], None)
        session = ChatSession(m, tok, gen, ChatOptions(thinking, reasoning_effort, tools, ctx),
                              messages=msgs, system=system)
        if prompt is not None:
            session.messages.append({"role": "user", "content": prompt})
        if session.messages and session.messages[-1].get("role") != "assistant":
            run_turn(session, quiet)
        if interactive:
            chat_loop(session, quiet)
        note_small_pages(m.ckpt, quiet)
        return
    ids = tok.encode(prompt, add_bos=True)
    capacity = ctx or len(ids) + max_tokens
    if len(ids) > capacity:
        raise DsvError(f"the prompt has {len(ids)} tokens, more than --ctx {capacity}")
    stats = GenerationStats()
    cache = m.new_cache(capacity)
    from tqdm import tqdm  # noqa: PLC0415
    bar = tqdm(total=len(ids), unit="tok", desc="prefill", leave=False,
               disable=not sys.stderr.isatty() or len(ids) <= prefill_chunk)
    for piece in run(m, tok, ids, gen, cache=cache, stats=stats, on_prefill=bar.update):
        bar.close()
        sys.stdout.write(piece)
        sys.stdout.flush()
    bar.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not quiet:
        click.echo(stats.summary(), err=True)
    note_small_pages(m.ckpt, quiet)


def note_small_pages(ckpt, quiet: bool) -> None:
    """Say so on stderr when much of the weights is mapped on small pages (Linux)."""
    from dsv4.runtime.pages import mapped_pages  # noqa: PLC0415
    pages = None if quiet or ckpt.in_memory else mapped_pages(ckpt.files())
    if pages is not None and many_small_pages(pages):
        click.echo(f"note: {pages_line(pages)}", err=True)
