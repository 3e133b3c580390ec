"""Write man/safer-audit.1 from the click definitions, so the man page cannot drift.

    python man/generate.py            # rewrite man/safer-audit.1
    python man/generate.py --check    # exit 1 if man/safer-audit.1 is out of date

The COMMANDS and OPTIONS sections come from the CLI itself; the other sections are
written here.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

from safer_audit import __version__
from safer_audit.cli import _register_plugin_commands, cli

PAGE = Path(__file__).with_name("safer-audit.1")

HEAD = r""".TH SAFER-AUDIT 1 "" "safer-audit {version}" "User Commands"
.SH NAME
safer-audit \- find flipped and noisy pairs in RLHF preference data
.SH SYNOPSIS
.B safer-audit
.RI [ --version ]
.I COMMAND
.RI [ OPTIONS ]
.I ARGS
.SH DESCRIPTION
.B safer-audit
audits pairwise preference data (a prompt, a chosen and a rejected response), the data
reward models learn from. It runs a reward model (or an encoder) over every pair, reads
the hidden states of one layer through a TopK sparse autoencoder (SAE), finds the SAE
features whose activation separates chosen from rejected responses (feature salience),
scores every pair by those features, and reports the pairs most likely flipped or noisy,
with the reasons. The method is that of the SAFER paper (Li et al., arXiv 2507.00665).
.PP
Without
.BR --model ,
the embedded all-MiniLM-L6-v2 encoder is used; it has no reward head, so the reward
margin comes from a cross-fitted Bradley-Terry head on its activations.
"""

TAIL = r""".SH EXIT STATUS
.TP
.B 0
Success.
.TP
.B 1
The check found what it was asked to fail on.
.TP
.B 2
Unusable input or configuration: a malformed dataset (the message names the file, the
line and the field), a missing model, an unreadable SAE or features file.
.TP
.B 130
.B review
stopped by Ctrl\-C, after its summary; every decision made is kept.
.SH FILES
.TP
.I $XDG_CACHE_HOME/safer-audit/activations/
The activation cache: one directory per model, layer, positions and max length, holding
safetensors shards named by the hash of their content, the SAEs trained on them (with their
feature labels), per\-text SAE codes, fitted heads and token counts.
.TP
.IR $XDG_CACHE_HOME/safer-audit/judges/ ", " $XDG_CACHE_HOME/safer-audit/labels/
Answers judges keep across runs, and the harm judge's sentence embeddings (judges/harm/); the
feature labels of SAEs given with
.BR \-\-sae .
.B safer\-audit cache info
lists every kind with its size,
.B safer\-audit cache clear
deletes them all.
.TP
.IR DIR /cfg.json ", " DIR /sae_weights.safetensors
An SAE in the SAELens layout (also read: sparsify's
.IR cfg.json " + " sae.safetensors ).
.SH ENVIRONMENT
.TP
.B SAFER_AUDIT_CACHE_DIR
Cache directory; overrides
.BR XDG_CACHE_HOME .
.TP
.B XDG_CACHE_HOME
Base of the default cache directory (default
.IR ~/.cache ).
.TP
.B SAFER_AUDIT_LOAD_PLUGINS
Comma-separated entry-point names of the third-party plugins to load; empty loads none.
.TP
.B HF_HUB_OFFLINE
When set, a model or dataset that is not local is an immediate error instead of a download.
.SH EXAMPLES
Check a dataset:
.PP
.RS
safer-audit validate data.jsonl
.RE
.PP
Scan it and write reports:
.PP
.RS
safer-audit scan data.jsonl --output report.html --output report.json
.RE
.PP
Look at one suspect:
.PP
.RS
safer-audit explain data.jsonl 3f2a9c01d4e5b6a7
.RE
.PP
Review the features, then scan with the reviewed file:
.PP
.RS
safer-audit features data.jsonl -o features.yaml
.br
safer-audit scan data.jsonl --features features.yaml
.RE
.SH SEE ALSO
README.md, and docs/ for the reference (cli.md, formats.md, gate.md, engines.md, plugins.md, caches.md), in the source distribution.
"""


def _escape(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _help_roff(text: str) -> str:
    """A command's help as roff: paragraphs filled, click's unwrapped blocks (a \\b line first) kept
    line for line (.nf), so a table of options stays a table."""
    blocks = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        if paragraph.startswith("\b\n"):
            blocks.append(".nf\n" + _escape(paragraph[2:]) + "\n.fi")
        else:
            blocks.append(_escape(paragraph))
    return "\n.sp\n".join(blocks)


def _commands(group: click.Group, prefix: str, ctx: click.Context):
    for name in sorted(group.list_commands(ctx)):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        yield f"{prefix}{name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ", ctx)


def _option_lines(command: click.Command, ctx: click.Context) -> list[str]:
    lines = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None or "--help" in getattr(param, "opts", ()):
            continue
        names, help_text = record
        lines += [".TP", f".B {_escape(names)}", _escape(help_text) or "\\&"]
    return lines


def render() -> str:
    _register_plugin_commands()
    ctx = click.Context(cli, info_name="safer-audit")
    out = [HEAD.format(version=__version__).rstrip("\n"), ".SH COMMANDS"]
    for name, command in _commands(cli, "", ctx):
        sub = click.Context(command, info_name=name, parent=ctx)
        usage = " ".join(command.collect_usage_pieces(sub))
        out += [".TP", f".B safer\\-audit {_escape(name)} {_escape(usage)}".rstrip(),
                _help_roff(command.help or "")]
    out.append(".SH OPTIONS")
    out += [".TP", ".B \\-\\-version", "Print the version and exit.", ".TP", ".BR \\-h \", \" \\-\\-help",
            "Show help for the tool or for any command."]
    for name, command in _commands(cli, "", ctx):
        if isinstance(command, click.Group):
            continue
        sub = click.Context(command, info_name=name, parent=ctx)
        lines = _option_lines(command, sub)
        if lines:
            out += [f".SS {_escape(name)}"] + lines
    out.append(TAIL.rstrip("\n"))
    return "\n".join(out) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not PAGE.exists() or PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE} is out of date: run python man/generate.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
