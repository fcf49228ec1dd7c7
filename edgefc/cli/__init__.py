"""The ``edgefc`` command line.

Each subcommand lives in its own module of this package and is imported only when it runs (so
``edgefc --help`` stays fast and the compiler commands never import torch). User errors
(:class:`edgefc.EdgefcError`) print one line and exit with status 2.
"""

from __future__ import annotations

import importlib
import signal
import sys

import click

from edgefc.errors import EdgefcError

# command name -> "module:attribute"; one line per subcommand.
COMMANDS: dict[str, str] = {
    "compile": "edgefc.cli.compile:compile_cmd",
    "calibrate": "edgefc.cli.calibrate:calibrate_cmd",
    "profile": "edgefc.cli.profile:profile_cmd",
    "passes": "edgefc.cli.compile:passes_cmd",
    "export": "edgefc.cli.export:export_cmd",
    "generate": "edgefc.cli.generate:generate_cmd",
    "train": "edgefc.cli.train:train_group",
    "data": "edgefc.cli.data:data_group",
    "eval": "edgefc.cli.eval:eval_cmd",
    "run": "edgefc.cli.run:run_cmd",
}

SHORT_HELP: dict[str, str] = {
    "compile": "Compile an ONNX model for a target (passes + lowering).",
    "calibrate": "Record every component's real inputs from the FP32 pipeline (for compile --calib/--eval).",
    "profile": "Cycle/DMA cost-model report of a model or build on an NPU target (table, JSON, trace, PNG).",
    "passes": "List the registered passes.",
    "export": "Export a text encoder / U-Net / VAE decoder from diffusers to ONNX.",
    "generate": "Text-to-image: text encoder -> U-Net (LCM steps) -> VAE decoder, writes a PNG.",
    "train": "Train and distil: a VAE (vae) or U-Net (sd) from scratch, BK-SDM distillation (kd), latent "
             "consistency distillation (lcm).",
    "data": "Prepare image/caption training data: curate real pairs, or synthesize attribute-controlled ones.",
    "eval": "Score images against their prompts with the deterministic verifier (alignment, Fréchet distance).",
    "run": "Run a TVM build (--emit tvm) on inputs from an .npz; --check compares with onnxruntime.",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, SHORT_HELP.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgefc")
def cli():
    """edgefc: compile compact Stable Diffusion models for a mobile NPU.

    \b
    edgefc export unet --arch bk-sdm-tiny -o unet.onnx
    edgefc compile unet.onnx --target exynos2400 -o build/unet
    edgefc profile build/unet --attention-breakdown
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds (temporary folders, staging folders
    removed) exactly as Ctrl-C does."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


#: the arguments of this run (after ``edgefc``), for the reproducibility block of report.json
ARGV: list[str] = []

#: the packages of the ``models`` extra (pyproject.toml): a companion command that needs one which is
#: not installed says so in one line (the compiler commands never import them)
MODELS_EXTRA = frozenset({"torch", "diffusers", "transformers", "accelerate", "safetensors", "onnxscript"})


def main(argv=None):
    """Entry point: run the CLI, turning user errors into one line and exit status 2 (a companion
    command run without the ``models`` extra too; a build that fails its handover check: 3);
    SIGTERM cleans up like Ctrl-C and exits with status 143."""
    ARGV[:] = list(sys.argv[1:] if argv is None else argv)
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, standalone_mode=False)
    except EdgefcError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(getattr(e, "exit_status", 2))  # 2: the user's input; 3: a build failed its handover check
    except ModuleNotFoundError as e:
        package = (e.name or "").split(".")[0]
        if package not in MODELS_EXTRA:
            raise
        click.echo(f"error: this command needs the models extra ({package} is not installed): "
                   f"pip install 'edgefc[models]'", err=True)
        sys.exit(2)
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, Terminated):
            click.echo("terminated", err=True)
            sys.exit(143)
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # a bad or missing argument or option: one line, like every user error
        where = "edgefc"
        if isinstance(e, click.UsageError) and e.ctx is not None:
            names, c = [], e.ctx
            while c is not None and c.parent is not None:  # the subcommands, not how Python was started
                names.insert(0, c.info_name)
                c = c.parent
            where = " ".join(["edgefc", *names])
        message = " ".join(e.format_message().split())
        click.echo(f"error: {message} (see '{where} --help')", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except Terminated:
        click.echo("terminated", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(0)
