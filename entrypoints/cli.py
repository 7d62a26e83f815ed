"""The ``maskdm`` console script: one subcommand per MLproject entry point."""

from __future__ import annotations

import gc
import importlib
import sys

import click

#: Subcommand -> module in this package whose ``command`` implements it. Loaded lazily so that
#: ``maskdm --help`` and each stage import only what they use.
COMMANDS = {
    "pretrain": "pretrain",
    "prune": "prune",
    "extract_masks": "extract_masks",
    "baseline_loss": "baseline_loss",
    "train_masks": "train_masks",
    "finetune": "finetune",
    "sample": "sample",
    "fid": "fid",
    "speed": "speed",
    "main": "main",
    "report": "report",
    "promote": "promote",
    "reap": "reap",
}

#: The commands a driver's warm server may run (every stage; never ``main`` itself).
WARM_COMMANDS = frozenset(COMMANDS) - {"main"}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if importlib.util.find_spec(f"entrypoints.{COMMANDS[name]}")]

    def main(self, *args, **kwargs):
        if not args and "args" not in kwargs and len(sys.argv) > 1 and sys.argv[1] in WARM_COMMANDS:
            # Started by a driver that keeps a warm server: the stage runs in a process forked
            # from it, which has imported torch, diffusers and MLflow already (maskdm.warm_start).
            from maskdm.warm_start.client import run_warm

            code = run_warm(__file__)
            if code is not None:
                raise SystemExit(code)
        # Bad option values get the same one-line form as every other user error.
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            raise SystemExit(130) from None
        except click.UsageError as exc:
            if exc.ctx is not None and exc.ctx.command is self and not exc.ctx.protected_args and not exc.ctx.args:
                click.echo(exc.ctx.get_help())
                raise SystemExit(0) from None
            click.echo(f"maskdm: error: {' '.join(exc.format_message().split())}", err=True)
            raise SystemExit(exc.exit_code) from None
        except click.ClickException as exc:
            click.echo(f"maskdm: error: {' '.join(exc.format_message().split())}", err=True)
            raise SystemExit(exc.exit_code) from None

    def get_command(self, ctx, name):
        if name not in COMMANDS or not importlib.util.find_spec(f"entrypoints.{COMMANDS[name]}"):
            return None
        return import_frozen(f"entrypoints.{COMMANDS[name]}").command


def import_frozen(module: str):
    """Import ``module`` with Python's cyclic garbage collector paused, then freeze what exists.

    A stage's imports (torch, diffusers, MLflow) allocate millions of objects and set off collection
    after collection that finds nothing to free: paused, the imports take about a sixth less CPU
    (docs/design.md#stages-that-start-warm). Frozen (``gc.freeze``), those objects are left out of
    every later collection while the stage runs. Both are what Python's gc documentation advises
    for a process that forks too (the warm server does the same)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(module)
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


@click.group(cls=LazyGroup, help="MaskDM: prune, mask-learn, finetune, sample and score DDPMs, tracked in MLflow.")
def cli():
    pass


if __name__ == "__main__":
    cli()
