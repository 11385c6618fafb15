"""``ckdiff replay RESULT.json``: re-run the command a JSON result records; say whether it still holds."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ckdiff.errors import InputError, UsageError
from ckdiff.text import printable
from ckdiff.commands import common

NAME = "replay"
SUMMARY = "re-run the command a JSON result records; exit 0 if verdict and statuses are unchanged"
REPLAYABLE = ("compare", "logits", "roundtrip", "golden", "check")  # commands that only read their inputs
MAX_RESULT = 256 << 20  # bytes of a RESULT.json read
# flags of the recorded command that write files or only shape the output: dropped before it re-runs
DROPPED = ("json", "html", "markdown", "junit", "github_summary", "no_github_summary", "force", "work", "quiet",
           "debug")


def parser(prog: str = "ckdiff replay"):
    p = common.Parser(prog=prog, description="Re-run the command recorded in a JSON result (written with --json) "
                      "on the same inputs, without writing its reports, and compare the verdict and every "
                      "status (tensor, check) with the recorded ones. Inputs whose size or header hash changed "
                      "are named. Exit 0 unchanged, 1 changed, 2 error.")
    p.add_argument("result", metavar="RESULT.json", help="a result written by ckdiff --json")
    p.add_argument("--json", metavar="PATH", help="write the new result (with its verification record) here")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="changed statuses listed")
    common.add_common(p, cache=False)
    return p


def load(path) -> dict:
    """The recorded result, checked: schema, kind and a command line of strings."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_RESULT:
            raise InputError(path, f"{size} bytes; a result larger than {MAX_RESULT >> 20} MiB is not read")
        doc = json.loads(p.read_bytes())
    except OSError as e:
        raise InputError(path, (e.strerror or str(e)).lower()) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(path, f"not a JSON result: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(doc, dict) or doc.get("schema") != "ckdiff.result/1":
        raise InputError(path, "not a ckdiff result (no \"schema\": \"ckdiff.result/1\")")
    if not isinstance(doc.get("result"), dict) or not isinstance(doc.get("verdict"), str):
        raise InputError(path, "a ckdiff result without its verdict and result")
    prov = doc.get("provenance")
    if prov is not None and not isinstance(prov, dict):
        raise InputError(path, "provenance: expected an object")
    argv = (prov or {}).get("argv")
    if argv is None:
        import shlex
        cmd = doc.get("command")
        if not isinstance(cmd, str) or not cmd.startswith("ckdiff "):
            raise InputError(path, "the result records no command to replay")
        try:
            argv = shlex.split(cmd)[1:]
        except ValueError as e:
            raise InputError(path, f"command: {e}") from None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise InputError(path, "provenance.argv: expected a non-empty list of strings")
    cwd = (prov or {}).get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise InputError(path, "provenance.cwd: expected a string")
    return {"doc": doc, "argv": argv, "cwd": cwd}


def _action(p, token: str):
    """The parser action an option token names, resolved as argparse does (exact, or a unique prefix)."""
    name = token.split("=", 1)[0]
    acts = p._option_string_actions
    if name in acts:
        return acts[name]
    if name.startswith("--"):
        hits = {acts[o] for o in acts if o.startswith(name)}
        if len(hits) == 1:
            return hits.pop()
    return None


def replay_argv(argv: list, trust_pickle: bool) -> tuple[str, list]:
    """(command name, its arguments) with the report, output and work-directory flags removed."""
    from ckdiff.commands import COMMANDS
    name, rest = (argv[0], argv[1:]) if argv[0] in COMMANDS else ("compare", list(argv))
    if name not in REPLAYABLE or name not in COMMANDS:
        raise UsageError(f"ckdiff replay: the recorded command is `ckdiff {printable(name)}`; only commands that "
                         f"read their inputs are replayed ({', '.join(n for n in REPLAYABLE if n in COMMANDS)})")
    p = COMMANDS[name].parser(f"ckdiff {name}")
    out, i = [], 0
    while i < len(rest):
        tok = rest[i]
        act = _action(p, tok) if tok.startswith("-") and tok != "-" else None
        if act is not None and act.dest == "trust_pickle" and not trust_pickle:
            raise UsageError("ckdiff replay: the recorded command passes --trust-pickle (runs code from its "
                             "inputs); replay it only with --trust-pickle")
        if act is not None and act.dest in DROPPED:
            i += 1
            takes = act.nargs is None or act.nargs == "?"
            if "=" not in tok and takes and i < len(rest) and (act.nargs is None or not rest[i].startswith("-")):
                i += 1  # its value
            continue
        out.append(tok)
        i += 1
    return name, out


def statuses(kind: str, d: dict) -> dict:
    """What must stay the same: every tensor's status, every check's outcome, the configs' differences."""
    out = {}
    for t in d.get("tensors") or []:
        if isinstance(t, dict) and "name" in t:
            out[f"tensor {t['name']}"] = t.get("status")
    for c in d.get("checks") or []:
        if isinstance(c, dict):
            key = " ".join(str(c.get(k) or "") for k in ("converter", "model", "variant", "check")).split()
            out["check " + " ".join(key)] = {True: "pass", False: "fail"}.get(c.get("ok"), "skipped")
    for f in d.get("config_diff") or []:
        if isinstance(f, list) and f:
            out[f"config {f[0]}"] = "differs"
    for f in d.get("config_findings") or []:
        out[f"finding {f}"] = "present"
    return out


def changes(old: dict, new: dict) -> list[str]:
    a, b = statuses(old.get("kind", ""), old["result"]), statuses(new.get("kind", ""), new["result"])
    out = [f"verdict: {old['verdict']} -> {new['verdict']}"] if old["verdict"] != new["verdict"] else []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"{printable(k)}: {a.get(k, 'absent')} -> {b.get(k, 'absent')}")
    return out


def run(argv, command: str = "") -> int:
    from ckdiff.commands import COMMANDS
    from ckdiff.provenance import changed_inputs
    a = parser().parse_args(argv)
    rec = load(a.result)
    common.check_target("json", a.json, (), getattr(a, "force", False))
    name, rest = replay_argv(rec["argv"], a.trust_pickle)
    console = common.console(a)
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="ckdiff-replay-") as tmp:
        out = str(Path(tmp) / "result.json")
        cwd = rec["cwd"] if rec["cwd"] and Path(rec["cwd"]).is_dir() else here
        again = common.command_line(([name] if name != "compare" else []) + rest)
        if not a.quiet:
            console.print(f"replaying in {printable(cwd)}: {printable(again)}", markup=False)
        os.chdir(cwd)
        try:
            COMMANDS[name].run([*rest, "--json", out, "--no-github-summary", "-q"], again)
        finally:
            os.chdir(here)
        new = json.loads(Path(out).read_text())
        if a.json:
            common.write_report(a.json, Path(out).read_bytes(), (), "json", getattr(a, "force", False))
    old = rec["doc"]
    diff = changes(old, new)
    moved = changed_inputs((old.get("provenance") or {}).get("inputs") or [],
                           (new.get("provenance") or {}).get("inputs") or [])
    if not diff:
        console.print(f"UNCHANGED: verdict {new['verdict']}, {len(statuses(new.get('kind', ''), new['result']))} "
                      "statuses as recorded", markup=False)
        if moved and not a.quiet:
            console.print("inputs changed without changing the result: " + "; ".join(map(printable, moved)),
                          markup=False)
        return 0
    console.print(f"CHANGED: {len(diff)} difference{'s' if len(diff) != 1 else ''} from the recorded result",
                  markup=False)
    if not a.quiet:
        for line in diff[:a.limit]:
            console.print(f"  {line}", markup=False)
        if len(diff) > a.limit:
            console.print(f"  ... {len(diff) - a.limit} more", markup=False)
        for line in moved:
            console.print(f"  input {printable(line)}", markup=False)
    return 1
