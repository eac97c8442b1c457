"""`dsv4 generate --chat`: one-shot or interactive chat in the V4 prompt format."""
from __future__ import annotations

import json
import sys

import click

from dsv4.runtime.chat_session import ChatSession, ContentDelta, End, ReasoningDelta, ToolCall

HELP = "commands: /reset (forget the conversation), /exit (quit; Ctrl-D too)"


class EventPrinter:
    """Shows reasoning apart from the answer: dimmed on a terminal, between
    '[reasoning]' / '[answer]' labels otherwise; tool calls as one JSON line each."""

    def __init__(self, out=None, color: bool | None = None):
        self.out = out or sys.stdout
        self.color = self.out.isatty() if color is None else color
        self.section = None

    def _enter(self, section: str) -> None:
        if section == self.section:
            return
        if self.section is not None:
            self.out.write("\n")
        if not self.color and section in ("reasoning", "answer"):
            self.out.write(f"[{section}]\n")
        self.section = section

    def __call__(self, ev) -> None:
        if isinstance(ev, ReasoningDelta):
            self._enter("reasoning")
            self.out.write(click.style(ev.text, dim=True) if self.color else ev.text)
        elif isinstance(ev, ContentDelta):
            self._enter("answer")
            self.out.write(ev.text)
        elif isinstance(ev, ToolCall):
            self._enter("tool")
            try:
                args = json.loads(ev.arguments_json)
            except json.JSONDecodeError:
                args = ev.arguments_json
            self.out.write(json.dumps({"tool_call": {"name": ev.name, "arguments": args}},
                                      ensure_ascii=False) + "\n")
            self.section = "tool-done"
        elif isinstance(ev, End):
            if self.section not in (None, "tool-done"):
                self.out.write("\n")
            self.section = None
        self.out.flush()


def run_turn(session: ChatSession, quiet: bool) -> None:
    show = EventPrinter()
    for ev in session.reply():
        show(ev)
    if not quiet and session.last_stats:
        click.echo(session.last_stats.summary(), err=True)


def interactive(session: ChatSession, quiet: bool, stream=None) -> None:
    """Read user lines until /exit or end of input; history is kept between turns."""
    stream = stream or sys.stdin
    tty = stream.isatty()
    click.echo(f"dsv4 chat ({'thinking' if session.opts.thinking else 'chat'} mode). {HELP}",
               err=True)
    while True:
        if tty:
            click.echo("> ", nl=False, err=True)
        line = stream.readline()
        if not line:
            break
        text = line.rstrip("\n")
        cmd = text.strip()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
            continue
        if cmd.startswith("/"):
            click.echo(f"unknown command {cmd}; {HELP}", err=True)
            continue
        if not cmd:
            continue
        session.messages.append({"role": "user", "content": text})
        run_turn(session, quiet)
