"""The `dsv4` command: a click group; each verb is a thin module calling the library."""
from __future__ import annotations

import os
import sys

import click

from dsv4.runtime.errors import DsvError


class DsvGroup(click.Group):
    """Turns library errors into one line on stderr and a non-zero exit (no traceback
    unless --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DsvError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"dsv4: error: {e}", err=True)
            sys.exit(1)
        except BrokenPipeError:            # e.g. `dsv4 info ... | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except KeyboardInterrupt:
            click.echo("\ndsv4: interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the user gets one line, --debug the traceback
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"dsv4: internal error: {type(e).__name__}: {e} "
                       "(run with --debug for the traceback)", err=True)
            sys.exit(2)


def _numba_cache_dir() -> None:
    """Compiled kernels are cached on disk: $NUMBA_CACHE_DIR if set, else under the dsv4
    cache folder ($DSV4_HOME or ~/.cache/dsv4), in numba/<digest of the kernel sources>
    (runtime/kernels/sources.py: Numba alone would miss edits to inlined helpers)."""
    from dsv4.runtime.kernels.sources import use_default_cache  # noqa: PLC0415
    use_default_cache()


@click.group(cls=DsvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="dsv4")
@click.pass_context
def cli(ctx: click.Context, debug: bool):
    """dsv4: run DeepSeek-V4 (Flash / Pro) on a CPU, straight from the official
    Hugging Face checkpoint folder.

    \b
    Quick start (a small random-weight model is made on first use):
      dsv4 generate --model tiny --prompt "Hello"
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _numba_cache_dir()


def _blas_env() -> None:
    """Before NumPy loads OpenBLAS: its idle threads sleep at once instead of spinning for
    ~2^28 cycles after each call, which stole the cores from the Numba regions that follow
    every sgemm in prefill (prefill 512 tokens ~8% faster on 2 cores; decode uses no BLAS)."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


_blas_env()


def _register():
    from . import bench, generate, info, make_model  # noqa: PLC0415
    cli.add_command(bench.bench)
    cli.add_command(generate.generate)
    cli.add_command(make_model.make_model)
    cli.add_command(info.info)


_register()


def main():
    cli(prog_name="dsv4")


if __name__ == "__main__":
    main()
