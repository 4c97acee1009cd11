"""How a Procfile command runs: through /bin/sh, as Heroku runs it, with exec.

`web: APP_CONFIG=x gunicorn app:app`, `$PORT` and `&&` all need a shell. But a shell
left in between would take the runner's signals (it SIGTERMs the instance's process
group) and die before the app finished its requests, and its exit status would hide
the app's. So:

- a simple command (no shell operators outside quotes) becomes
  `[assignments] exec command ...`: the shell replaces itself with the app, which then
  is the process the runner watches (dash exports the assignments to it);
- a compound one (`a && b`, pipes, `;`) keeps the shell, with traps that make it exit
  right after its foreground job once the group got TERM/INT/HUP, instead of going on
  to the next command. The job itself gets the signal from the group.
"""
from __future__ import annotations

import re
import shlex

SHELL = "/bin/sh"
_OPERATOR_CHARS = set("();<>|&")
_ASSIGNMENT = re.compile(
    r"""\s*[A-Za-z_][A-Za-z0-9_]*=(?:'[^']*'|"(?:[^"\\]|\\.)*"|\\.|[^\s'"\\])*""")
_TRAPS = "trap 'exit 143' TERM; trap 'exit 130' INT; trap 'exit 129' HUP; "
# words `exec` cannot run (the shell's own builtins and keywords): left to the shell
_SHELL_WORDS = frozenset({
    ".", ":", "alias", "break", "cd", "continue", "eval", "exec", "exit", "export",
    "getopts", "hash", "if", "for", "while", "until", "case", "local", "read",
    "readonly", "return", "set", "shift", "source", "times", "trap", "type", "ulimit",
    "umask", "unalias", "unset", "wait", "!", "{", "}"})


def is_simple(command: str) -> bool:
    """True when the command has no shell operators (outside quotes) or newlines."""
    if "\n" in command.strip():
        return False
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return not any(tok and set(tok) <= _OPERATOR_CHARS for tok in lexer)
    except ValueError:          # unbalanced quotes: let the shell say what is wrong
        return False


def with_exec(command: str) -> str:
    """`A=1 B='x y' cmd args` -> `A=1 B='x y' exec cmd args`."""
    pos = 0
    while True:
        m = _ASSIGNMENT.match(command, pos)
        if m is None or (m.end() < len(command) and not command[m.end()].isspace()):
            break
        pos = m.end()
    rest = command[pos:].lstrip()
    if not rest or rest.split(None, 1)[0] in _SHELL_WORDS:
        return command          # only assignments, or a builtin: nothing to exec
    return f"{command[:pos].strip()} exec {rest}".lstrip()


def shell_argv(command: str) -> list[str]:
    """The argv that runs a Procfile command with Heroku's semantics."""
    if not command.strip():
        raise ValueError("empty command")
    script = with_exec(command) if is_simple(command) else _TRAPS + command
    return [SHELL, "-c", script]
