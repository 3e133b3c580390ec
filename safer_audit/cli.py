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


def _register_plugin_commands():
    try:
        load_plugins().hook.register_commands(cli=cli)
    except PluginError as exc:
        _fail(str(exc))


def main(argv=None):
    _register_plugin_commands()
    cli.main(args=argv, prog_name="safer-audit")
