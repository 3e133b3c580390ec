"""The ``safer-audit`` command line: options, help, messages and exit codes only.

Every command is a thin wrapper over library functions. Exit status: 0 success,
1 the audit found what it was asked to fail on (gate), 2 unusable input or usage.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from dataclasses import MISSING, dataclass, is_dataclass, replace
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .common.progress import ProgressBar
from .common.terminal import json_text, plain
from .config import (
    COMMAND_GROUPS,
    EVALUATE_POSITIONS,
    MAX_SEED,
    POSITIONS,
    ActivationConfig,
    OptionField,
    ReadOptions,
    SaeTrainConfig,
    ScanConfig,
    default_cache_dir,
    option_fields,
)
from .errors import EXIT_BAD_INPUT, EXIT_FINDINGS, SaferAuditError, inert
from .plugins import load_plugins, lookup, plugin_info
from .version import __version__

EXIT_BUG = 70  # sysexits' EX_SOFTWARE: not the gate's 1, not bad input's 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def _fail(message: str, code: int = EXIT_BAD_INPUT):
    """Print an error to stderr, one line per line of ``message``, made inert, and exit."""
    # Split at newlines only: splitlines() would also break at \r, \v, \x1c.. and U+2028, which
    # inert must show as escapes instead
    for line in str(message).split("\n"):
        click.echo(f"Error: {inert(line)}", err=True)
    sys.exit(code)


def _os_error_message(exc: OSError) -> str:
    """``path: reason`` for a system error (full disk, read-only directory, missing file)."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{exc.filename}: {reason}"
    return reason


class AuditGroup(click.Group):
    """The command group, and the one place errors become messages and exit codes.

    A SaferAuditError is the user's to fix: one line each, exit 2. A system error (disk
    full, permission denied) is the same. Anything else is a bug: it says so, with the
    traceback under --debug.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except SaferAuditError as exc:
            _fail(str(exc), exc.exit_code)
        except OSError as exc:
            _fail(_os_error_message(exc))
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"Error: this is a bug in safer-audit {__version__}, please report it: "
                       f"{type(exc).__name__}: {inert(exc)}", err=True)
            click.echo("Run the command again with `safer-audit --debug ...` for the traceback.", err=True)
            sys.exit(EXIT_BUG)


# Old spellings of renamed options: each still works for a release, with a warning. The value is what it
# becomes (--json is --format json); a command is rewritten only when it has the new option.
RENAMED_OPTIONS = {
    "--out": ("--output",),
    "--from-report": ("--report",),
    "--json": ("--format", "json"),
}


class AuditCommand(click.Command):
    """A command that still takes the old spellings of RENAMED_OPTIONS, each with one warning line on stderr."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, renamed_to_current(self, args))


def renamed_to_current(command: click.Command, args: list[str]) -> list[str]:
    """``args`` with each old spelling of an option of ``command`` replaced by the current one."""
    current = {opt for param in command.params for opt in getattr(param, "opts", ())}
    own = current | {opt for param in command.params for opt in getattr(param, "secondary_opts", ())}
    out: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":  # the rest are arguments, whatever they look like
            return out + args[index:]
        name, sep, value = arg.partition("=")
        new = RENAMED_OPTIONS.get(name)
        if new is None or name in own or new[0] not in current:
            out.append(arg)
            continue
        click.echo(f"Warning: {name} is deprecated and goes in a later release; use {' '.join(new)}", err=True)
        out += [*new, value] if sep else list(new)
    return out


AuditGroup.command_class = AuditCommand
AuditGroup.group_class = type  # subgroups (cache) are AuditGroups: their commands take the old spellings too


def stdout_console() -> Console:
    # No string is parsed as markup or emoji codes: text from data must show as it is
    return Console(highlight=False, soft_wrap=False, markup=False, emoji=False)


@click.group(cls=AuditGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="safer-audit")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error (a bug).")
@click.pass_context
def cli(ctx, debug):
    """Audit RLHF preference data: find flipped and noisy pairs with reward-model SAE features.

    \b
    Pipeline: pairs -> reward-model activations -> sparse autoencoder
    -> safety-feature salience -> per-pair scores -> ranked report.
    """
    ctx.obj = {"debug": debug}


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
format_option = click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text",
                             show_default=True, help="Output on stdout: a table for people, or JSON for programs.")


@cli.command(name="plugins")
@format_option
def plugins_command(output_format):
    """List the loaded plugins, their versions and what each registers."""
    infos = plugin_info()
    if output_format == "json":
        from dataclasses import asdict

        click.echo(json_text([asdict(info) for info in infos], indent=2))
        return
    table = Table(title="safer-audit plugins")
    for column in ("plugin", "version", "hooks", "registers"):
        table.add_column(column, overflow="fold")
    for info in infos:
        registers = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info.registers.items())
        table.add_row(plain(info.name), plain(info.version or ""), plain(", ".join(info.hooks)), plain(registers))
    stdout_console().print(table)


# --------------------------------------------------------------------------- options
#
# Every option is declared once. Settings are fields of the config dataclasses (config.py), with
# their help in the field's metadata; options_from turns fields into click options and hands the
# command one typed object. A new field is a new option of every command that takes its class.


@dataclass(frozen=True)
class _Param:
    """A click parameter for one (possibly nested) field: ``path`` from the decorated class down."""

    name: str  # the click parameter name: the field's name
    path: tuple[str, ...]
    spec: OptionField

    def option(self):
        meta, spec = self.spec.metadata, self.spec
        default = None if spec.default is MISSING else spec.default  # a default_factory: None means "its default"
        kwargs: dict = {"help": meta["help"], "default": default}
        if spec.kind is bool:
            kwargs["is_flag"] = True
        elif meta.get("multiple"):  # a tuple of strings, the option repeated
            kwargs["multiple"], kwargs["default"] = True, ()
        elif spec.choices is not None:
            kwargs["type"] = click.Choice(spec.choices)
        elif "pattern" in meta:
            kwargs["type"] = _Pattern(meta["pattern"], meta["help"])
        elif "path" in meta:
            kwargs["type"] = click.Path(path_type=Path, **meta["path"])
        elif spec.kind in (int, float) and ("min" in meta or "max" in meta):
            range_type = click.IntRange if spec.kind is int else click.FloatRange
            kwargs["type"] = range_type(meta.get("min"), meta.get("max"))
        elif spec.kind in (int, float):
            kwargs["type"] = spec.kind
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        kwargs["show_default"] = default is not None and spec.kind is not bool
        flags = meta.get("flag", "--" + spec.name.replace("_", "-")).split("/")
        return click.option(*flags, self.name, **kwargs)


class _Pattern(click.ParamType):
    """A string from an open set described by a regular expression (--device: cuda:N)."""

    name = "text"

    def __init__(self, pattern: str, described: str):
        self.regex, self.described = re.compile(pattern), described

    def convert(self, value, param, ctx):
        if isinstance(value, str) and self.regex.fullmatch(value):
            return value
        self.fail(f"{value!r} is not one of: {self.described}", param, ctx)


def _params(cls, groups: tuple[str, ...] | None, exclude: tuple[str, ...], prefix: tuple[str, ...] = ()) -> list:
    """The fields of ``cls`` that are options: with help, or a nested config (in ``groups`` when given)."""
    out = []
    for spec in option_fields(cls):
        path = (*prefix, spec.name)
        if ".".join(path) in exclude or (groups is not None and spec.metadata.get("group") not in groups):
            continue
        if "keys" in spec.metadata:  # a dict whose keys a dataclass declares (labeller_options)
            out += [_Param(s.name, (*path, s.name), s) for s in option_fields(spec.metadata["keys"])]
        elif is_dataclass(spec.kind):
            out += _params(spec.kind, None, exclude, path)
        elif spec.help is not None:
            out.append(_Param(spec.name, path, spec))
    return out


def _build(cls, params: list[_Param], values: dict, depth: int = 0):
    """``cls`` from the command line's ``values``; fields no option sets keep their defaults."""
    kwargs = {}
    for spec in option_fields(cls):
        mine = [p for p in params if p.path[depth] == spec.name]
        if not mine:
            continue
        if "keys" in spec.metadata:  # only the keys given: the labeller's factory decides the rest
            kwargs[spec.name] = {p.path[-1]: values[p.name] for p in mine if values[p.name] is not None}
        elif len(mine[0].path) > depth + 1:
            kwargs[spec.name] = _build(spec.kind, mine, values, depth + 1)
        elif spec.metadata.get("multiple"):  # repeated: in order, once each; none given is the default
            kwargs[spec.name] = tuple(dict.fromkeys(values[spec.name])) or spec.default
        elif values[spec.name] is not None or spec.default is not MISSING:
            kwargs[spec.name] = values[spec.name]
    return cls(**kwargs)


def options_from(cls, dest: str, *, groups: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                 finish=None):
    """A decorator: the option fields of dataclass ``cls`` as click options; the command gets one ``cls``
    object as ``dest`` instead of them. ``groups``: only fields of these groups (metadata ``group``);
    ``exclude``: dotted field paths left out (the command declares them otherwise); ``finish(obj)``
    adjusts the built object."""
    params = _params(cls, groups, exclude)
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise TypeError(f"two options of {cls.__name__} share a parameter name: {sorted(names)}")

    def build(values: dict):
        made = _build(cls, params, values)
        return finish(made) if finish is not None else made

    def decorator(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            kwargs[dest] = build({name: kwargs.pop(name) for name in names})
            return command(*args, **kwargs)

        for param in reversed(params):
            wrapper = param.option()(wrapper)
        return wrapper

    decorator.build = build  # the object from a context's params (tests, and commands that need it twice)
    return decorator


def field_option(cls, name: str):
    """One field of ``cls`` as a plain option (its value passed as it is): a single shared option."""
    return next(p for p in _params(cls, None, ()) if p.name == name).option()


def _finish_scan_config(config: ScanConfig) -> ScanConfig:
    config.seed = config.sae_train.seed  # --seed seeds the SAE training and the cross-fitting folds alike
    _check_judges(config.judges)
    return config


def scan_options(*groups: str, exclude: tuple[str, ...] = ()):
    """The ScanConfig options of ``groups`` (model, data, sae, category, labels), as one ``config``."""
    return options_from(ScanConfig, "config", groups=groups, exclude=exclude, finish=_finish_scan_config)


cache_dir_option = field_option(ActivationConfig, "cache_dir")
# scan's options, to build a ScanConfig from any command's params (tests)
scan_config_from = scan_options(*COMMAND_GROUPS["scan"]).build


def _steps(quiet: bool) -> ProgressBar:
    return ProgressBar(Console(stderr=True), enabled=not quiet)


def _check_judges(names: tuple[str, ...] | None) -> None:
    """The judges of --judge, checked before any long work."""
    from .scoring.types import registered_judge  # not scoring.judges: a scan whose report is cached loads no torch

    for name in names or ():
        registered_judge(name)  # ConfigError names the known judges; makes a client, sends nothing


def _print_judge_costs(costs: dict) -> None:
    for name, cost in costs.items():
        click.echo(inert(f"judge {name}: " + ", ".join(f"{key} {value}" for key, value in cost.items())), err=True)


# ------------------------------------------------------------------------------ scan

@cli.command()
@click.argument("data")
@scan_options(*COMMAND_GROUPS["scan"])
@click.option("--top", type=click.IntRange(0), default=20, show_default=True, help="Suspects shown in the terminal.")
@click.option("--output", "-o", "outputs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report here (repeatable); the format comes from the extension. "
                   "- writes it to standard output (JSON unless --format says otherwise).")
@click.option("--format", "output_format", default=None,
              help="Format of every --output, when the extension does not say (see `safer-audit plugins`).")
@click.option("--no-cache", "no_cache", is_flag=True,
              help="Scan again rather than reuse the cached report of the same data, options, code and model "
                   "(and keep none); the activation, SAE and codes caches are still used.")
@quiet_option
def scan(data, top, outputs, output_format, no_cache, quiet, config: ScanConfig):
    """Scan DATA and rank its pairs, most likely flipped or noisy first.

    DATA is a .jsonl, .jsonl.gz, .json, .parquet or .csv file, a datasets directory, or a
    hub dataset id when online. Activations and a trained SAE are cached, so a re-run on
    the same data is fast; a re-run of a file with the same options, code and model reads
    the whole report back from the cache (--no-cache: scan again).
    """
    from .common.files import refuse_inputs, writable_target
    from .errors import ConfigError
    from .pipeline.report_cache import scan_report
    from .report.types import STDOUT, export_report, find_exporter
    from .report.view import print_report

    to_stdout = any(str(path) == STDOUT for path in outputs)
    for path in outputs:  # fail on what would fail at the end before the long work
        if str(path) == STDOUT:
            find_exporter(path, output_format or "json")
            continue
        find_exporter(path, output_format)
        refuse_inputs(path, [data])
        writable_target(path)
        if not path.parent.is_dir():
            raise ConfigError(f"{path}: the directory {path.parent} does not exist")
    from .common.progress import next_steps

    def warn(message: str) -> None:
        click.echo(inert(f"Warning: {message}"), err=True)

    result = scan_report(data, config, steps=_steps(quiet).step, warn=warn, use_cache=not no_cache)
    if not to_stdout:  # with -o - standard output carries the report alone
        print_report(result.report, stdout_console(), top=top)
    _print_judge_costs(result.judge_costs)
    for path in outputs:
        export_report(result.report, path, output_format)
        if str(path) != STDOUT:
            click.echo(f"wrote {inert(path)}", err=True)
    # the options given to this scan that explain and review take too, so they see the same scores
    ctx = click.get_current_context()
    shared = {p.name for p in explain.params}
    options = []
    for param in ctx.command.params:
        if param.name not in shared or not isinstance(param, click.Option) or ctx.get_parameter_source(
                param.name) not in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT):
            continue
        value, flag = ctx.params[param.name], max(param.opts, key=len)
        if param.is_flag:
            options += [flag] if value else [max(param.secondary_opts, key=len)] if param.secondary_opts else []
        else:
            options += [item for v in (value if param.multiple else [value]) for item in (flag, v)]
    suspects = result.report.suspects(1)
    top_pair = suspects[0].pair_id if suspects else None
    for line in next_steps(data, outputs, top_pair, options, str(DEFAULT_DECISIONS)):
        click.echo(inert(line), err=True)


@cli.command()
@click.argument("data")
@scan_options(*COMMAND_GROUPS["features"])
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="Feature cards shown.")
@click.option("--output", "-o", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a features file (YAML, or JSON by extension) to review, edit and pass to --features.")
@quiet_option
def features(data, top, out, quiet, config: ScanConfig):
    """Show the safety features of DATA as cards, and write a features file to review."""
    from .common.files import write_atomic
    from .features.salience import features_file_text
    from .pipeline.scan import run_scan
    from .report.view import print_feature_cards

    config.cards_with_contexts = top
    result = run_scan(data, config, steps=_steps(quiet).step)
    print_feature_cards(result.report.features[:top], stdout_console())
    if out is not None:
        write_atomic(out, features_file_text(result.features, json_format=out.suffix == ".json",
                                             cards=result.report.features),
                     protect=[data])
        click.echo(inert(f"wrote {out}: set include: true / false and labels, then scan --features {out}"), err=True)


@cli.command()
@click.argument("data")
@click.argument("pair")
@click.option("--report", "report_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Read the pair's scores and features from this scan report (JSON) instead of rescanning.")
@scan_options(*COMMAND_GROUPS["explain"])
@quiet_option
def explain(data, pair, report_path, quiet, config: ScanConfig):
    """Show one pair in full: the request, both responses, its scores, and the features behind them.

    PAIR is a pair id, a unique prefix of one (like git), FILE:LINE, or a line number of
    DATA. With --report, the scores and features come from that scan's report.json (the
    pair's text is read from DATA and must match it); without, DATA is scanned with the
    model and SAE options, and the tokens each feature fires on are shown too.
    """
    from .data import load_pairs
    from .workflows.explain import explain_from_report, explain_pair, find_pair, print_explanation

    rows = load_pairs(data, config.read).pairs.iter_rows(named=True)
    row = find_pair(rows, pair, data)  # before any scan: a wrong name fails at once
    if report_path is not None:
        explanation = explain_from_report(_report_for(report_path, config), row, str(report_path))
    else:
        from .pipeline.scan import run_scan

        explanation = explain_pair(run_scan(data, config, steps=_steps(quiet).step), row["pair_id"])
    print_explanation(explanation, stdout_console())


def _report_for(path: Path, config: ScanConfig):
    """The scan report at ``path`` (explain, review, clean --report): it knows its profile (run.profile);
    a --profile given on the command line that is not the report's is a ConfigError, not ignored."""
    from .errors import ConfigError
    from .workflows.clean import load_report

    report = load_report(path)
    source = click.get_current_context().get_parameter_source("profile")
    if source is click.core.ParameterSource.COMMANDLINE and config.profile != report.run.profile:
        raise ConfigError(f"{path} was made by a scan with --profile {report.run.profile}, not "
                          f"{config.profile}: drop --profile, or scan again with it")
    return report


DEFAULT_DECISIONS = Path(".safer-audit/decisions.json")


def _read_key(prompt: str) -> str:
    """One key from the terminal, echoed (no Enter needed)."""
    click.echo(prompt, nl=False)
    key = click.getchar()
    click.echo(inert(key))
    if key == "\x03":  # Ctrl-C (click.getchar may also raise it itself): stop, the decisions so far are saved
        raise KeyboardInterrupt
    if key == "\x04":  # Ctrl-D: quit
        raise EOFError
    if key in ("F", "N", "O"):  # the decision, then a note typed on the terminal (Enter alone: none)
        return key.lower() + " " + click.prompt("note", default="", show_default=False)
    return key


def _read_line(prompt: str) -> str:
    """One line from a pipe or script: a key, then an optional note."""
    click.echo(prompt, nl=False)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    click.echo()
    return line


@cli.command()
@click.argument("data")
@click.option("--report", "report_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Review the suspects of this scan report (JSON) instead of scanning DATA now.")
@click.option("--decisions", "decisions_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_DECISIONS, show_default=True,
              help="The decisions file to add to (made if missing; its directory too).")
@click.option("--reviewer", default=None, help="Who decides. Default: git config user.name and user.email.")
@click.option("--all", "review_all", is_flag=True, help="Show pairs decided before too (to change a decision).")
@scan_options(*COMMAND_GROUPS["review"])
@quiet_option
def review(data, report_path, decisions_path, reviewer, review_all, quiet, config: ScanConfig):
    """Walk the suspects of DATA one by one and record a decision for each.

    Keys: f flipped (clean flips it back), n noisy (clean drops it), o ok (clean keeps it,
    the gate never fails on it), s skip, q quit; F, N or O decide the same and then ask for
    a note. From a pipe, one key a line; the rest of the line is a note. Each decision is saved at once, and pairs decided before are not
    shown again (unless --all), so a review resumes where it stopped.

    Then: safer-audit clean DATA --decisions FILE -o CLEANED.
    """
    from .data import PairReader
    from .workflows.decisions import default_reviewer, prepare_directory
    from .workflows.review import locate, review_findings

    if report_path is not None:
        report = _report_for(report_path, config)
    else:
        from .pipeline.scan import run_scan

        report = run_scan(data, config, steps=_steps(quiet).step).report
    reader = PairReader(data, config.read)
    where = locate(report.suspects(), reader, str(report_path or "the scan"), data)
    prepare_directory(decisions_path)
    ask = _read_key if sys.stdin.isatty() else _read_line
    outcome = review_findings(report.findings, decisions_path, ask=ask, console=stdout_console(),
                              reviewer=reviewer or default_reviewer(), where=where, review_all=review_all,
                              protect=[data] + ([report_path] if report_path else []))
    click.echo(inert(("Interrupted: every decision made is saved. " if outcome.interrupted else "")
                     + f"{outcome.decided} decided, {outcome.skipped} skipped, {outcome.remaining} of "
                     f"{outcome.suspects} suspects undecided; decisions in {decisions_path}"), err=True)
    if outcome.interrupted:
        sys.exit(EXIT_INTERRUPTED)


@cli.command()
@click.argument("data")
@scan_options(*COMMAND_GROUPS["evaluate"], exclude=("activations.positions", "sae_train.seed"))
@click.option("--positions", type=click.Choice(POSITIONS), multiple=True, default=EVALUATE_POSITIONS,
              show_default=True, help="Position sets whose score_safe is measured (repeatable); the first one is "
                                      "also used for the other scorers.")
@click.option("--flip-rate", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="Fraction of pairs flipped (chosen and rejected swapped) in the copy that is scanned.")
@click.option("--seed", "seeds", type=click.IntRange(0, MAX_SEED), multiple=True, default=(0,), show_default=True,
              help="Seed of the flips and the cross-fitting folds (repeatable: mean and spread over seeds).")
@click.option("--flip-mode", "flip_modes", type=click.Choice(["uniform", "length", "margin"]), multiple=True,
              default=("uniform",), show_default=True,
              help="Which pairs are likelier flipped (repeatable): any alike; those whose rejected response is "
                   "longer (annotators prefer length); those the reward margin finds close.")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the results as JSON.")
@quiet_option
def evaluate(data, positions, flip_rate, seeds, flip_modes, output, quiet, config: ScanConfig):
    """Measure how well each scorer finds pairs flipped on purpose in a copy of DATA.

    Reports AUROC and precision at the top 1/5/10% for score_safe at each position set,
    every judge (the reward margin, the SAE-head margin, those of --judge) and its
    length-residualised variant, the combined ranking, the stacked judges, an oracle stack
    fitted on the true flips (an upper bound), response length and random, all on the same
    flipped copies; and each judge's correlation with the length difference. Each
    --flip-mode is measured separately.
    """
    from .common.files import write_atomic
    from .pipeline.stages import read_data
    from .workflows.evaluate import evaluate as run_evaluation

    config = replace(config, activations=replace(config.activations, positions=positions[0]))
    pairs = read_data(data, config).pairs
    console = stdout_console()
    results = []
    for flip_mode in dict.fromkeys(flip_modes):
        result = run_evaluation(pairs, config, flip_rate=flip_rate, seeds=seeds, positions=tuple(positions),
                                source=data, flip_mode=flip_mode, steps=_steps(quiet).step,
                                on_seed=lambda seed, _s, mode=flip_mode: console.print(f"{mode}: seed {seed} done",
                                                                                       style="dim"))
        results.append(result)
        table = Table(title=f"Finding {result.flipped} flipped of {result.pairs} pairs "
                            f"({flip_rate:.0%}, {flip_mode} flips), {len(seeds)} seed(s): mean ± sd")
        summary = result.summary()
        correlations = result.length_correlations()
        metrics = list(next(iter(summary.values())))
        table.add_column("scorer", no_wrap=True)
        for metric in metrics:
            table.add_column(metric.upper() if metric == "auroc" else metric, justify="right", no_wrap=True)
        table.add_column("ρ length", justify="right", no_wrap=True)
        for scorer, values in sorted(summary.items(), key=lambda item: -item[1]["auroc"][0]):
            # Text, not a markup string: "[response]" would be read as a style tag
            rho = f"{correlations[scorer]:+.2f}" if scorer in correlations else ""
            table.add_row(plain(scorer), *(f"{values[m][0]:.3f}±{values[m][1]:.3f}".replace("0.", ".")
                                          for m in metrics), rho)
        console.print(table)
    if output is not None:
        # one mode: its results; several: a list of them, in the order asked
        payload = results[0].to_dict() if len(results) == 1 else {"modes": [r.to_dict() for r in results]}
        write_atomic(output, json.dumps(payload, indent=2) + "\n", protect=[data])
        click.echo(f"wrote {inert(output)}", err=True)


@cli.command(name="train-sae")
@click.argument("data")
@click.option("--output", "-o", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write cfg.json and sae_weights.safetensors into.")
@options_from(ActivationConfig, "activations")
@options_from(ReadOptions, "read")
@options_from(SaeTrainConfig, "train")
@field_option(ScanConfig, "sae_backend")
@quiet_option
def train_sae_command(data, out, sae_backend, quiet, activations: ActivationConfig, read: ReadOptions,
                      train: SaeTrainConfig):
    """Train a TopK SAE on the activations of DATA and save it to --output."""
    from .pipeline.scan import train_sae_on_data

    stats = train_sae_on_data(data, out, activations, train, read=read, sae_backend_name=sae_backend,
                              steps=_steps(quiet).step)
    table = Table(title=plain(f"SAE written to {out}"))
    for column in ("FVU", "L0", "dead fraction", "tokens seen", "steps", "seconds"):
        table.add_column(column, justify="right")
    table.add_row(f"{stats.fvu:.4f}", f"{stats.l0:.1f}", f"{stats.dead_fraction:.2%}", f"{stats.tokens_seen:,}",
                  str(stats.steps), f"{stats.seconds:.1f}")
    stdout_console().print(table)


@cli.command()
@click.argument("data")
@click.option("--output", "-o", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The cleaned dataset, in DATA's format (same extension).")
@click.option("--report", "report_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Select from this scan report (JSON) instead of scanning DATA now.")
@click.option("--drop-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Select this fraction of the pairs, most suspicious first.")
@click.option("--threshold", type=float, default=None, help="Select the pairs with suspicion >= this.")
@click.option("--min-flip-probability", type=click.FloatRange(0, 1), default=None, metavar="P",
              help="Select the pairs whose flip probability (the posterior of a flip mixture fitted to the "
                   "stacked judges' margins; every model's judges with --profile thorough) is >= P. Refused, with "
                   "the reason, when the judges are too weak for the report to give one.")
@click.option("--decisions", "decisions_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Act on review decisions (safer-audit review): flip back the pairs marked "
                                 "flipped, drop those marked noisy, keep those marked ok. No scan needed.")
@click.option("--only", type=click.Choice(["flipped", "noisy"]), multiple=True,
              help="With --decisions: act only on these verdicts (repeatable). Default: both.")
@click.option("--mode", type=click.Choice(["drop", "flip"]), default=None,
              help="Drop the selected pairs, or flip them back (swap chosen and rejected). Default: drop.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the manifest. Default: the output's name + .manifest.json.")
@click.option("--force", is_flag=True, help="Replace an existing output and manifest.")
@click.option("--dry-run", is_flag=True, help="Show what would change and write nothing.")
@scan_options(*COMMAND_GROUPS["clean"])
@quiet_option
def clean(data, out, report_path, decisions_path, only, drop_fraction, threshold, min_flip_probability, mode,
          manifest, force, dry_run, quiet, config: ScanConfig):
    """Write a copy of DATA with suspicious pairs dropped or flipped back, and a manifest.

    Selection is by the combined suspicion ranking of a scan (the one scan reports, rather
    than score_safe alone as in the paper, as it also weighs the reward margin):

    \b
      --report R        R's non-clean pairs (with --mode flip:
                        its flipped ones)
      --drop-fraction F the pairs of rank <= F x pairs
      --threshold T     the pairs with suspicion >= T
      --min-flip-probability P
                        the pairs whose flip probability is >= P
      --decisions D     D's decided pairs: flipped ones flipped
                        back, noisy ones dropped, ok ones kept
                        (--only flipped: just those)

    Without --report or --decisions, DATA is scanned first with the model, SAE and
    --profile options.

    Records not selected are copied byte-for-byte (.jsonl, .jsonl.gz content, .json,
    .csv) or as equal rows (.parquet); a flipped JSON record is rewritten on one line.
    The manifest lists the input and output sha256, the rule, and every changed pair with
    its rank, scores, category and reason. Both files are written to a temporary file and
    renamed; DATA and the report are never written over.
    """
    from .common.files import writable_target
    from .workflows.clean import clean_dataset

    for path in (out, manifest):  # before any long work: a device or read-only output is refused at once
        if path is not None:
            writable_target(path)
    rules = {"--drop-fraction": drop_fraction, "--threshold": threshold, "--min-flip-probability": min_flip_probability}
    given = [name for name, value in rules.items() if value is not None]
    if decisions_path is not None:
        if mode is not None or given:
            raise click.UsageError("--decisions sets each pair's action: give it without --mode, --drop-fraction, "
                                   "--threshold or --min-flip-probability")
    elif only:
        raise click.UsageError("--only selects verdicts of --decisions; give --decisions too")
    elif report_path is None and not given:
        raise click.UsageError("select pairs with --report, --drop-fraction, --threshold or "
                               "--min-flip-probability, or act on --decisions")
    if len(given) > 1:
        raise click.UsageError(f"give one rule, not both {' and '.join(given)}")
    mode = mode or "drop"
    decisions = None
    if decisions_path is not None:
        from .workflows.decisions import read_decisions

        decisions = read_decisions(decisions_path)
    if report_path is not None:
        report = _report_for(report_path, config)
    elif decisions is not None:
        report = None
    else:
        from .pipeline.scan import run_scan

        report = run_scan(data, config, steps=_steps(quiet).step).report
    result = clean_dataset(data, out, report, mode=mode, drop_fraction=drop_fraction, threshold=threshold,
                           min_flip_probability=min_flip_probability,
                           decisions=decisions, decisions_path=decisions_path, only=only or ("flipped", "noisy"),
                           manifest=manifest, report_path=report_path, force=force, dry_run=dry_run,
                           read=config.read)
    if result.mode == "decisions":
        flips = sum(c.action == "flip" for c in result.changes)
        done = f"flipped back {flips} and dropped {len(result.changes) - flips}"
        missing = result.selection.parameters["not_in_data"]
        if missing:
            click.echo(inert(f"note: {missing} of {len(decisions)} decisions name pairs not in {data} "
                             "(edited or removed since the review)"), err=True)
    else:
        done = f"{ {'drop': 'dropped', 'flip': 'flipped'}[mode]} {len(result.changes)}"
    if dry_run:
        _print_changes(result)
        click.echo(inert(f"dry run: would have {done} of {result.pairs} pairs "
                         f"({result.selection.rule}); nothing written"), err=True)
    else:
        click.echo(inert(f"{done} of {result.pairs} pairs ({result.selection.rule}): "
                         f"wrote {result.out} and {result.manifest_path}"), err=True)


def _print_changes(result) -> None:
    table = Table(title=plain(f"{result.mode}: {len(result.changes)} of {result.pairs} pairs of {result.source}"))
    for column in ("pair id", "line", "action", "reason"):
        table.add_column(column, overflow="fold")
    for change in result.changes:
        table.add_row(plain(change.pair_id), str(change.line), plain(change.action), plain(change.reason))
    stdout_console().print(table)


# ------------------------------------------------------------------------------ gate

# the decisions file the baseline and the gate read (review writes it, clean acts on it: their own options)
gate_decisions_option = click.option(
    "--decisions", "decisions_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Review decisions (safer-audit review); pairs marked ok never fail. "
         "Default: decisions.json next to the baseline, if there is one.")


@cli.command(name="baseline")
@click.argument("data", nargs=-1, required=True)
@click.option("--output", "-o", "out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(".safer-audit/baseline.json"),
              show_default=True, help="The baseline file; the SAE it trains and its heads are written beside it.")
@scan_options(*COMMAND_GROUPS["baseline"])
@gate_decisions_option
@quiet_option
def baseline_command(data, out, decisions_path, quiet, config: ScanConfig):
    """Scan DATA once and record what `safer-audit gate` compares against.

    The baseline is a small deterministic JSON file to commit and review: each pair's id,
    content digest, rounded scores and category, and the frozen reference: model
    fingerprint, layer, positions, max length, how the data was read (and how many records
    that skipped), SAE (path and hash), selected features, Bradley-Terry heads, tool version
    and the cut-offs, all covered by one content digest that the gate checks. The SAE (trained
    on DATA without --sae, else a copy of the one given) and the heads are saved next to the
    baseline (its name + "-sae", "-heads.safetensors"), so the gate never trains and reads
    nothing outside the baseline's directory.
    """
    from .workflows.gate import build_baseline

    decisions, decisions_path = _gate_decisions(decisions_path, out)
    made = build_baseline(list(data), out, config, steps=_steps(quiet).step, decisions=decisions)
    counts = {c: sum(1 for pid, e in made.pairs.items() if e["category"] == c and pid not in made.cleared)
              for c in ("flipped", "noisy", "quality")}
    cleared = sum(1 for pid in made.cleared if made.pairs[pid]["category"] != "clean")
    skipped = made.header["skipped"]
    click.echo(inert(f"wrote {out}: {len(made.pairs)} pairs ({', '.join(f'{n} {c}' for c, n in counts.items())}"
                     + (f"; {cleared} more marked ok in {decisions_path}" if cleared else "")
                     + (f"; {skipped} records skipped" if skipped else "")
                     + f"); SAE {made.header['sae']['path']}, heads {made.header['heads']['path']}"))


def _gate_decisions(path: Path | None, baseline_path: Path):
    """The decisions the gate and baseline read: the file given, else decisions.json beside the baseline."""
    from .workflows.decisions import read_decisions
    from .workflows.gate import default_decisions_path

    path = path or default_decisions_path(baseline_path)
    return (read_decisions(path), path) if path is not None else (None, None)


def _fail_on(_ctx, _param, value: str) -> tuple[str, ...]:
    from .workflows.gate import FAIL_ON_CHOICES

    names = tuple(name.strip() for name in value.split(",") if name.strip())
    for name in names:
        if name not in FAIL_ON_CHOICES:
            raise click.BadParameter(f"{name!r} is not one of {', '.join(FAIL_ON_CHOICES)}")
    return names


@cli.command(name="gate")
@click.argument("data", nargs=-1, required=True)
@click.option("--baseline", "baseline_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The baseline made by `safer-audit baseline`.")
@click.option("--fail-on", default="flipped,quality,changed", show_default=True, callback=_fail_on,
              help="Comma-separated kinds of pair that fail the check: flipped, noisy, quality (new pairs in that "
                   "category); changed: a baseline pair whose chosen and rejected were swapped or whose text was "
                   "edited, whatever its category now; removed: baseline pairs no longer in DATA (listed, but "
                   "not failing, by default).")
@click.option("--max-new", type=click.IntRange(0), default=0, show_default=True,
              help="New pairs in --fail-on categories tolerated before the check fails (changed pairs never are).")
@click.option("--format", "output_format", metavar="text|json|junit", default="text", show_default=True,
              help="Output on stdout: lines, JSON, or JUnit XML (a failing test case per failing pair); plugins may "
                   "add formats (see safer-audit plugins).")
@click.option("--mark-ok", "mark_ok_ids", multiple=True, metavar="PAIR_ID",
              help="Record a listed pair, as it is now, as reviewed and ok in the decisions file, so that it "
                   "no longer fails (repeatable; commit the decisions file).")
@click.option("--update-baseline", is_flag=True,
              help="Accept the current state after review: rewrite the baseline with the pairs of DATA "
                   "(give every data file), scoring new ones with the frozen reference.")
@cache_dir_option
@gate_decisions_option
@quiet_option
def gate_command(data, baseline_path, fail_on, max_new, output_format, mark_ok_ids, update_baseline, cache_dir,
                 decisions_path, quiet):
    """Check DATA against a baseline: fail on new pairs that look flipped or broken, and on changed labels.

    Only pairs whose id is not in the baseline, or whose content changed, are scored, with
    the baseline's frozen model, SAE, features and heads; the model is loaded only when there
    are such pairs. By default the check fails on a new pair that is flipped (as suspicious as
    the baseline's top 4%, its --flipped-fraction, and every ranked signal prefers the rejected
    response) or has
    a quality problem (identical or empty responses, a contradiction of another pair), and on
    every changed pair (chosen and rejected swapped, or the text edited under a kept id),
    whatever its category now. A pair marked ok in review (--mark-ok, or --decisions, default
    decisions.json next to the baseline) is listed but never fails. A removed pair is listed.
    Under GitHub Actions (GITHUB_ACTIONS=true) they are also annotations on stderr.

    The baseline is checked before it is trusted: its content digest, the files it names
    (regular files inside its directory), and, when the model runs, its cut-offs and the
    scores of a seeded sample of its pairs, scored again. Records the baseline's read options
    skip are counted; more than when it was made is an error.

    Exit status: 0 when nothing fails (or with --update-baseline), 1 when something does,
    2 when the data or the baseline is unusable, edited, or made with another tool version,
    model, SAE or heads.

    pre-commit: the hook safer-audit-gate (.pre-commit-hooks.yaml) runs `safer-audit gate
    --baseline .safer-audit/baseline.json` on the staged files matched by your `files:`
    pattern, in the environment where safer-audit is installed; see
    examples/pre-commit-config.yaml.
    """
    import os

    from .backends.gate_formats import github_annotations
    from .workflows.gate import accept, mark_ok, run_gate

    render = lookup("gate_format", output_format)  # a wrong format fails before the data is read
    decisions, decisions_path = _gate_decisions(decisions_path, baseline_path)
    result = run_gate(list(data), baseline_path, fail_on=fail_on, max_new=max_new, cache_dir=cache_dir,
                      steps=_steps(quiet).step, decisions=decisions,
                      decisions_path=str(decisions_path) if decisions_path else None)
    if mark_ok_ids:
        from .workflows.decisions import default_reviewer

        target = decisions_path or baseline_path.parent / "decisions.json"
        mark_ok(result, list(dict.fromkeys(mark_ok_ids)), target, reviewer=default_reviewer(),
                protect=[*data, baseline_path])
        click.echo(inert(f"marked {len(set(mark_ok_ids))} pair(s) ok in {target}"), err=True)
    if update_baseline:
        accept(result)
    click.echo(render(result).rstrip("\n"))
    if os.environ.get("GITHUB_ACTIONS") == "true":
        for line in github_annotations(result):
            click.echo(line, err=True)
    if update_baseline:
        click.echo(inert(f"updated {baseline_path}: {len(result.current_ids)} pairs ({result.new} new or changed)"),
                   err=True)
    elif result.failed:
        sys.exit(EXIT_FINDINGS)


# ----------------------------------------------------------------------------- cache

@cli.group()
def cache():
    """Inspect or clear the cache: activations, trained SAEs, codes, heads, token counts, judges' answers, harm
    embeddings, labels, reports."""


@cache.command(name="info")
@cache_dir_option
@format_option
def cache_info_command(cache_dir, output_format):
    """List what the cache holds: one row per model, layer, positions and max length with its size on disk;
    then every kind of entry with its size: activations, trained SAEs, per-text SAE codes, fitted heads, token
    counts, judges' answers, the harm judge's sentence embeddings, labels of given SAEs and whole scan reports
    (--format json: each entry's too)."""
    from .workflows.cache_admin import cache_summary, cache_view

    summary = cache_summary(cache_dir or default_cache_dir())
    if output_format == "json":
        click.echo(json_text(summary, indent=2))
        return
    stdout_console().print(cache_view(summary))


@cache.command(name="clear")
@cache_dir_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (required when stdin is not a terminal).")
def cache_clear_command(cache_dir, yes):
    """Delete every kind of cache entry: activations, trained SAEs, codes, heads, token counts, judges' answers,
    harm embeddings, labels and scan reports."""
    from .errors import ConfigError
    from .workflows.cache_admin import cache_clear

    root = cache_dir or default_cache_dir()
    if not yes:
        if not sys.stdin.isatty():  # piped or scripted: nobody to ask, so never delete unasked
            raise ConfigError(f"not clearing the cache in {root}: no terminal to confirm on; "
                              "pass --yes to clear it")
        click.confirm(inert(f"Delete the cache in {root}?"), abort=True)
    freed = cache_clear(root)
    click.echo(inert(f"freed {freed / 2**20:.1f} MiB in {root}"))




@cli.command(name="validate")
@click.argument("path")
@options_from(ReadOptions, "read")
@click.option("--max-length", type=click.IntRange(min=1), metavar="N",
              help="Also count responses longer than N tokens (lost to truncation) and conversations "
                   "whose context gets cut.")
@click.option("--model", metavar="DIR",
              help="Count tokens with this local model's tokenizer (with --max-length; default: the "
                   "embedded MiniLM-L6).")
@format_option
def validate_command(path, max_length, model, output_format, read: ReadOptions):
    """Check that the preference data at PATH can be read, and report cheap data-quality findings.

    PATH is a .jsonl, .jsonl.gz, .json, .parquet or .csv file, a datasets directory
    (save_to_disk), - for JSON Lines on standard input, or a hub dataset hf://owner/name
    (online only).

    Findings: exact duplicate pairs, contradicting pairs (the same responses the other
    way round), identical chosen and rejected, empty responses, chosen and rejected with
    different contexts, and with --max-length, responses too long to survive truncation.

    Exit status 0 when the data is usable, 2 when it is not: the first invalid records
    are listed (or, with --skip-invalid, no record was usable).
    """
    from .data import token_counter, validate_dataset

    if model is not None and max_length is None:
        raise click.UsageError("--model only counts tokens for --max-length; give --max-length too")
    count_tokens = None
    if max_length is not None:
        try:
            count_tokens = token_counter(model)
        except (OSError, ValueError) as exc:
            _fail(f"cannot load the tokenizer of {model or 'the embedded model'}: {exc}")
    summary = validate_dataset(path, read, max_length=max_length, count_tokens=count_tokens)
    if output_format == "json":
        click.echo(json_text(summary.to_dict(), indent=2))
    else:
        _print_validation(summary)
    if not summary.usable:
        _fail(f"{path}: no usable pairs ({summary.skipped} of {summary.records} records skipped)")


def _print_validation(summary) -> None:
    console = stdout_console()
    facts = Table(title="data", show_header=False, title_justify="left")
    facts.add_column("what")
    facts.add_column("value", overflow="fold")
    facts.add_row("source", plain(summary.source))
    facts.add_row("records read", str(summary.records))
    facts.add_row("schema", f"{summary.schema or '?'} ({'detected' if summary.schema_detected else 'forced'})")
    facts.add_row("pairs", str(summary.pairs))
    facts.add_row("skipped", str(summary.skipped))
    if summary.max_length is not None:
        facts.add_row(f"context cut at {summary.max_length} tokens", f"{summary.context_cut} pairs")
    console.print(facts)
    for error in summary.skipped_errors:
        console.print(plain(f"skipped {error}"))
    findings = Table(title="findings", title_justify="left")
    for column in ("kind", "count", "first locations"):
        findings.add_column(column, justify="right" if column == "count" else "left")
    for kind, count in summary.findings.items():
        firsts = "\n".join(inert(f"line {f.line}: {f.detail}") for f in summary.examples[kind])
        findings.add_row(plain(kind), str(count), Text(firsts))
    if summary.max_length is None:
        findings.add_row("truncated", "-", "not checked (give --max-length)")
    console.print(findings)


def _register_plugin_commands():
    try:
        load_plugins().hook.register_commands(cli=cli)
    except SaferAuditError as exc:
        _fail(str(exc))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A library warning is one line for the user, not a source location."""
    click.echo(inert(f"Warning: {message}"), err=True)


def main(argv=None):
    import warnings

    warnings.showwarning = _show_warning
    _register_plugin_commands()
    cli.main(args=argv, prog_name="safer-audit")
