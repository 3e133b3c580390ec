"""The ``safer-audit`` command line: options, help, messages and exit codes only.

Every command is a thin wrapper over library functions. Exit status: 0 success,
1 the audit found what it was asked to fail on (gate), 2 unusable input or usage.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .plugins import PluginError, load_plugins, plugin_info

EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT):
    """Print a one-line error to stderr and exit; never a traceback for bad input."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def stdout_console() -> Console:
    return Console(highlight=False, soft_wrap=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="safer-audit")
def cli():
    """Audit RLHF preference data: find flipped and noisy pairs with reward-model SAE features.

    \b
    Pipeline: pairs -> reward-model activations -> sparse autoencoder
    -> safety-feature salience -> per-pair scores -> ranked report.
    """


@cli.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def plugins_command(as_json):
    """List the loaded plugins, their versions and what each registers."""
    infos = plugin_info()
    if as_json:
        import json
        from dataclasses import asdict

        click.echo(json.dumps([asdict(info) for info in infos], indent=2))
        return
    table = Table(title="safer-audit plugins")
    for column in ("plugin", "version", "hooks", "registers"):
        table.add_column(column)
    for info in infos:
        registers = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info.registers.items())
        table.add_row(info.name, info.version or "", ", ".join(info.hooks), registers)
    stdout_console().print(table)


from .data import PREFERENCES, SCHEMAS  # noqa: E402  (belongs in the import block above)


@cli.command(name="validate")
@click.argument("path")
@click.option("--schema", type=click.Choice(SCHEMAS),
              help="Force a schema instead of detecting it from the first record: hh (HH-RLHF "
                   "transcripts), prompt (prompt/chosen/rejected), messages (chat message lists), "
                   "pku (response_0/response_1 and a preference index).")
@click.option("--split", help="The split of a datasets directory or hub dataset with several splits.")
@click.option("--preference", type=click.Choice(PREFERENCES), default="better", show_default=True,
              help="pku schema: take the chosen response from better_response_id or safer_response_id.")
@click.option("--skip-invalid", is_flag=True,
              help="Skip records that cannot be used and count them, instead of stopping at them.")
@click.option("--max-length", type=click.IntRange(min=1), metavar="N",
              help="Also count responses longer than N tokens (lost to truncation) and conversations "
                   "whose context gets cut.")
@click.option("--model", metavar="DIR",
              help="Count tokens with this local model's tokenizer (with --max-length; default: the "
                   "embedded MiniLM-L6).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def validate_command(path, schema, split, preference, skip_invalid, max_length, model, as_json):
    """Check that the preference data at PATH can be read, and report cheap data-quality findings.

    \b
    PATH is a .jsonl, .jsonl.gz, .json, .parquet or .csv file, a datasets directory
    (save_to_disk), or a hub dataset id owner/name (online only).
    Findings: exact duplicate pairs, contradicting pairs (the same responses the other
    way round), identical chosen and rejected, empty responses, chosen and rejected with
    different contexts, and with --max-length, responses too long to survive truncation.

    Exit status 0 when the data is usable, 2 when it is not: the first invalid records
    are listed (or, with --skip-invalid, no record was usable).
    """
    from .data import DataError, DataErrors, token_counter, validate_dataset

    if model is not None and max_length is None:
        raise click.UsageError("--model only counts tokens for --max-length; give --max-length too")
    count_tokens = None
    if max_length is not None:
        try:
            count_tokens = token_counter(model)
        except (OSError, ValueError) as exc:
            _fail(f"cannot load the tokenizer of {model or 'the embedded model'}: {exc}")
    try:
        summary = validate_dataset(path, schema=schema, split=split, skip_invalid=skip_invalid,
                                   preference=preference, max_length=max_length, count_tokens=count_tokens)
    except DataError as exc:
        errors = exc.errors if isinstance(exc, DataErrors) else [exc]
        for error in errors[:-1]:
            click.echo(f"Error: {error}", err=True)
        _fail(str(errors[-1]))
    if as_json:
        import json

        click.echo(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False))
    else:
        _print_validation(summary)
    if not summary.usable:
        _fail(f"{path}: no usable pairs ({summary.skipped} of {summary.records} records skipped)")


def _print_validation(summary) -> None:
    console = stdout_console()
    facts = Table(title="data", show_header=False, title_justify="left")
    facts.add_column("what")
    facts.add_column("value", overflow="fold")
    facts.add_row("source", summary.source)
    facts.add_row("records read", str(summary.records))
    facts.add_row("schema", f"{summary.schema or '?'} ({'detected' if summary.schema_detected else 'forced'})")
    facts.add_row("pairs", str(summary.pairs))
    facts.add_row("skipped", str(summary.skipped))
    if summary.max_length is not None:
        facts.add_row(f"context cut at {summary.max_length} tokens", f"{summary.context_cut} pairs")
    console.print(facts)
    for error in summary.skipped_errors:
        console.print(f"skipped {error}", markup=False)
    findings = Table(title="findings", title_justify="left")
    for column in ("kind", "count", "first locations"):
        findings.add_column(column, justify="right" if column == "count" else "left")
    for kind, count in summary.findings.items():
        firsts = "\n".join(f"line {f.line}: {f.detail}" for f in summary.examples[kind])
        findings.add_row(kind, str(count), firsts)
    if summary.max_length is None:
        findings.add_row("truncated", "-", "not checked (give --max-length)")
    console.print(findings)


def _register_plugin_commands():
    try:
        load_plugins().hook.register_commands(cli=cli)
    except PluginError as exc:
        _fail(str(exc))


def main(argv=None):
    _register_plugin_commands()
    cli.main(args=argv, prog_name="safer-audit")
