"""The `hirelc-onnx` command: subcommands live in hirelc_onnx/commands/, one module each."""
from __future__ import annotations

import sys
import traceback

import click

from hirelc_onnx.commands.benchmark import benchmark
from hirelc_onnx.commands.compress import compress
from hirelc_onnx.commands.evaluate import evaluate
from hirelc_onnx.commands.feedback import configure_logging, report_repeats, split_verbosity
from hirelc_onnx.commands.inspect import inspect
from hirelc_onnx.config import ConfigError
from hirelc_onnx.errors import UserError, interface

__all__ = ["main"]


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit code 2, never a traceback.

    Any other exception is a bug; it too is one `error: internal error: ...` line (exit code 1),
    with the traceback printed only under -v. The specific causes fuzzing found are fixed where
    they arise (tests/fuzz/); this is the backstop.

    Click's own usage errors (a bad option value, a missing argument) print a usage block by
    default; here they are one `error:` line too, pointing at --help, with click's exit code (2).
    Ctrl-C is exit code 130 wherever it lands. `compress` adds 3: a goal missed (commands/compress.py).
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        # -v / -vv anywhere on the line: moved before the subcommand, where the group's option reads them
        args, verbosity = split_verbosity(sys.argv[1:] if args is None else list(args))
        args = ["-v"] * verbosity + args
        if not standalone_mode:
            with interface("cli"):
                return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            with interface("cli"):  # errors name options as flags (--budget), not as parameters (budget=)
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            hint = " (see --help)" if isinstance(exc, click.UsageError) else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort as exc:  # click's word for Ctrl-C outside a command (while parsing, say)
            interrupted = isinstance(exc.__cause__, KeyboardInterrupt)
            click.echo("interrupted" if interrupted else "aborted", err=True)
            sys.exit(130 if interrupted else 1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (UserError, ConfigError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # backstop for a bug: still one line; the traceback only under -v
            if ctx.params.get("verbose"):
                traceback.print_exc()
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else "(no message)"
            click.echo(f"error: internal error: {type(exc).__name__}: {message} "
                       "(run with -v for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True,
              help="-v: hirelc-onnx's progress and INFO lines; -vv: debug output of every library too. "
                   "May stand anywhere on the line.")
@click.version_option(package_name="hirelc-onnx")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Compress ONNX models with RL-searched pruning and quantization."""
    repeats = configure_logging(verbose)
    ctx.call_on_close(lambda: report_repeats(repeats))


for command in (inspect, evaluate, benchmark, compress):
    main.add_command(command)


if __name__ == "__main__":  # `python -m hirelc_onnx.cli` runs the CLI too, never silently nothing
    main()
