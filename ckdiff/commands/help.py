"""``ckdiff help [COMMAND [CONVERTER]]``: the overview, or one command's help."""
from __future__ import annotations

from ckdiff.errors import UsageError
from ckdiff.commands import common

NAME = "help"
SUMMARY = "this overview, or the help of one command (ckdiff help convert to-jetstream)"


def parser(prog: str = "ckdiff help"):
    from ckdiff.commands import COMMANDS
    p = common.Parser(prog=prog, description="Show the overview of ckdiff's commands, or one command's help.")
    p.add_argument("topic", nargs="*", metavar="COMMAND",
                   help="a command (one of: " + ", ".join(COMMANDS) + "), and for convert a converter")
    return p


def overview() -> str:
    from ckdiff.commands import COMMANDS
    from ckdiff.commands.compare import parser as compare_parser
    lines = ["ckdiff: verify LLM checkpoint converters.", "",
             "usage: ckdiff A B [options]          compare two checkpoints (the default command)",
             "       ckdiff COMMAND [options]      one of the commands below",
             "       ckdiff help COMMAND           a command's help (also: ckdiff COMMAND --help)", "",
             "commands:"]
    width = max(len(n) for n in COMMANDS)
    lines += [f"  {n.ljust(width)}  {m.SUMMARY}" for n, m in COMMANDS.items()]
    lines += ["", "Exit codes: 0 equivalent / pass, 1 differ / fail, 2 usage or input error (one line on stderr;",
              "--debug shows the traceback). Long flags take either spelling: --true-vocab-size, --true_vocab_size.",
              "", common.formats_help(), "",
              compare_parser("ckdiff [compare]").format_help()]
    return "\n".join(lines)


def text(topic) -> str:
    from ckdiff.commands import COMMANDS
    if not topic:
        return overview()
    name = topic[0]
    if name not in COMMANDS:
        raise UsageError(f"ckdiff help: unknown command {name!r}; commands: {', '.join(COMMANDS)}")
    p = COMMANDS[name].parser(f"ckdiff {name}")
    if len(topic) > 1 and name == "convert":
        from ckdiff.commands.convert import CONVERTERS
        if topic[1] not in CONVERTERS:
            raise UsageError(f"ckdiff help convert: unknown converter {topic[1]!r}; converters: "
                             f"{', '.join(CONVERTERS)}")
        sub = next(a for a in p._actions if a.dest == "converter")
        return sub.choices[topic[1]].format_help()
    return p.format_help()


def run(argv, command: str = "") -> int:
    a = parser().parse_args(argv)
    common.console(a).print(text(a.topic), markup=False, highlight=False, crop=False)
    return 0
