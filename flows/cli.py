"""`tunefactory`: run a recipe through the DAG, or plan it with --dry-run.

User mistakes print one line and exit 1; `--debug` shows the traceback. Ctrl-C or SIGTERM stops
running builds at their next step, records the flow run as Cancelled and stops the Prefect server
the command started.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

QUIET_DEFAULTS = {  # no phoning home from a machine that may have no network
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # not the table-creation chatter of a new SQLite store
    # The ephemeral Prefect server (Python API use) can take a while to start on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Per-file save/load bars of datasets and transformers (transformers reads the hub's switch); the long
    # loops (training, generation, scoring) keep theirs. Set here rather than by importing both libraries to
    # call their switches: a command that loads no data or model (a no-op re-run) need not import them.
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
NOISY_LOGGERS = ("mlflow", "alembic", "httpx", "httpcore", "urllib3", "filelock")
# bitsandbytes tries to fetch an optional CPU kernel from the hub at import and warns when it cannot (always,
# offline); the built-in kernel is used instead. Prefect's workers that ship log lines and events to its server
# warn "Still processing items: N items remaining..." when the command flushes them on the way out, which is
# whenever lines are still queued then: chatter after the command's own last line.
SILENCED_LOGGERS = ("bitsandbytes.backends.cpu.ops", "APILogWorker", "EventsWorker")


def count(minimum: int):
    """An argparse type: a whole number of at least `minimum`."""
    def parse(text: str) -> int:
        if not text.strip().lstrip("-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"give a whole number of at least {minimum}, not {text!r}")
        return int(text)
    return parse


def add_recipe_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("recipe", help="recipe YAML (LlamaFactory keys)")
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a recipe key (repeatable)")
    command.add_argument("--home", help="artifact store root (default $TUNEFACTORY_HOME or ./artifacts)")


def add_source_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("source", help="a recipe YAML, or a model folder (a Hugging Face checkpoint)")
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a recipe key (repeatable)")
    command.add_argument("--home", help="artifact store root (default $TUNEFACTORY_HOME or ./artifacts)")


def add_engine_arguments(command: argparse.ArgumentParser) -> None:
    add_source_arguments(command)
    command.add_argument("--adapter", help="a PEFT adapter folder to apply (unmerged)")
    command.add_argument("--template", help="chat template (default: the recipe's, or the folder tokenizer's)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tunefactory", description="Fine-tune language models through a cached DAG.")
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    debug = argparse.ArgumentParser(add_help=False)  # --debug after the command too, as after `run`
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    def add(group, name: str, summary: str) -> argparse.ArgumentParser:
        return group.add_parser(name, parents=[debug], help=summary)

    commands = top.add_subparsers(dest="command", required=True)
    run = add(commands, "run", "run a recipe end to end (cached stages are reused)")
    add_recipe_arguments(run)
    run.add_argument("--dry-run", action="store_true", help="validate and print the planned DAG; build nothing")
    run.add_argument("--experiment", help="MLflow experiment (default: the recipe file's name)")
    run.add_argument("--parallel", type=int, metavar="N",
                     help="stages run at once where the DAG allows (default 1 on <= 2 cores, else 2)")
    data_command = add(commands, "data", "inspect a recipe's data")
    data = data_command.add_subparsers(dest="data_command", required=True)
    preview = add(data, "preview", "tokenize the data (cached) and print decoded samples and statistics")
    add_recipe_arguments(preview)
    export = add(commands, "export", "merge an adapter into its base and write it to export_dir")
    add_recipe_arguments(export)
    retune = add(commands, "retune", "re-tune a registered model if its data or recipe changed")
    add_recipe_arguments(retune)
    retune.add_argument("--model-name", required=True, help="the registered model in MLflow")
    retune.add_argument("--metric", default="rougeL", help="the score that decides promotion (default rougeL)")
    retune.add_argument("--margin", type=float, default=0.0, help="how much better the challenger must be")
    serve = add(commands, "serve", "serve finetune/<recipe> and retune/<recipe> deployments (Prefect)")
    serve.add_argument("--recipes", default=None, help="folder of recipe files (default configs/recipes)")
    serve.add_argument("--limit", type=int, default=None, help="flow runs at once (default: no limit)")
    serve.add_argument("--retune-schedule", choices=("keep", "on", "off"), default="keep",
                       help="the weekly retune schedules: keep each as it is on the server (new ones start off), "
                            "or switch them all on or off")
    compare = add(commands, "compare", "compare finetune runs from MLflow: a table and a PNG")
    compare.add_argument("--experiment", help="MLflow experiment (default: the newest run's)")
    compare.add_argument("--metric", default="rougeL", help="the score to compare (default rougeL)")
    compare.add_argument("--last", type=count(1), default=5, help="how many of the newest runs (default 5)")
    compare.add_argument("--out", default="compare.png", help="where to write the figure (default compare.png)")
    runs = add(commands, "runs", "recent runs (finetune, export, data preview) with each stage's outcome and key")
    runs.add_argument("--last", type=count(1), default=10)
    gc = add(commands, "gc", "delete store artifacts no recent run or registered model needs")
    gc.add_argument("--keep-last", type=count(0), default=10,
                    help="keep what the newest N finetune runs used (0: only what registered models need)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    gc.add_argument("--home", help="artifact store root (default $TUNEFACTORY_HOME or ./artifacts)")
    gc.add_argument("--staging", action="store_true",
                    help="also delete interrupted builds' checkpoints (kept by default for a re-run to resume)")
    gc.add_argument("--force", action="store_true",
                    help="collect even when no run in the tracking store used this store's artifacts")
    verify = add(commands, "verify", "re-hash every artifact (and a recipe's sources) instead of trusting "
                                 "file status; damaged artifacts are rebuilt on the next run")
    verify.add_argument("recipe", nargs="?", help="also re-read the sources this recipe plans from")
    verify.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    verify.add_argument("--home", help="artifact store root (default $TUNEFACTORY_HOME or ./artifacts)")
    evaluate = add(commands, "eval", "score a recipe's base and tuned models, or a model folder, on an exam")
    add_source_arguments(evaluate)
    evaluate.add_argument("--experiment", help="MLflow experiment (default: the recipe or folder name)")
    chat = add(commands, "chat", "chat in the terminal with a recipe's tuned model or a model folder")
    add_engine_arguments(chat)
    chat.add_argument("--system", default="", help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=512, help="reply length limit (default 512)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    api = add(commands, "api", "serve a recipe's tuned model or a model folder as an OpenAI-style API")
    add_engine_arguments(api)
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--api-key", default=os.environ.get("TUNEFACTORY_API_KEY"),
                     help="require this bearer key (default $TUNEFACTORY_API_KEY; none = open)")
    api.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    api.add_argument("--max-concurrency", type=int, default=4, help="generations running or waiting at once")
    api.add_argument("--max-request-bytes", type=int, default=1_000_000)
    templates = add(commands, "templates", "list chat templates, or show one on a sample conversation")
    template_commands = templates.add_subparsers(dest="templates_command")
    show = add(template_commands, "show", "render a sample conversation, trained spans marked ⟦ ⟧")
    show.add_argument("name")
    show.add_argument("--model", help="a model folder whose tokenizer renders the sample (needed for 'auto')")
    show.add_argument("--tools", action="store_true",
                      help="a tool-use sample: a tool listed, parallel calls, their results, a reply")
    show.add_argument("--tool-format", help="write tools in this format instead of the template's own "
                      "(default, qwen, llama3, mistral, glm4; implies --tools)")
    return top


class HideUserErrorTracebacks(logging.Filter):
    """On the console a user mistake is the CLI's one line, not Prefect's traceback or failed-state echo
    (the Prefect API log keeps both)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from tasks.core.errors import TuneFactoryError
        from tasks.core.stage import BuildInterrupted

        # A user mistake, or a build stopped by Ctrl-C / SIGTERM: the CLI's own line says it.
        if record.exc_info and isinstance(record.exc_info[1], TuneFactoryError | BuildInterrupted):
            return False
        message = record.getMessage()
        if "NotReady(\"Upstream task run" in message or "Failed('tunefactory: error:" in message:
            return False  # a consequence of the failure, or the line the CLI prints itself
        return not ("Failed(" in message and any(f"exception {name}:" in message
                                                 for name in user_error_names() | {"BuildInterrupted"}))


def user_error_names() -> set[str]:
    from tasks.core.errors import TuneFactoryError

    classes, names = [TuneFactoryError], set()
    while classes:
        cls = classes.pop()
        names.add(cls.__name__)
        classes += cls.__subclasses__()
    return names


def quiet_user_errors() -> None:
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    for handler in logging.getLogger().handlers:
        handler.addFilter(HideUserErrorTracebacks())


def home_of(args: argparse.Namespace) -> str | None:
    return str(Path(args.home).resolve()) if args.home else None


def dry_run(recipe, home: str | None) -> str:
    from flows.plan import describe, plan_run
    from tasks.core.store import ArtifactStore

    store = ArtifactStore(home)
    described = describe(plan_run(recipe, store), store)
    width = max([28, *(len(planned.step.label) + 1 for planned in described)])
    lines = [f"store: {store.root}", f"{'stage':<{width}} {'key':<12} status"]
    for planned in described:
        if planned.key is None:
            lines.append(f"{planned.step.label:<{width}} {'-':<12} to build (after {planned.waits_for})")
        else:
            status = "cached" if planned.cached else "to build"
            lines.append(f"{planned.step.label:<{width}} {planned.key[:12]:<12} {status}")
    return "\n".join(lines)


def preview_data(args: argparse.Namespace) -> int:
    from flows.data_preview import data_preview
    from flows.plan import plan_run
    from flows.prefect_server import temporary_server
    from tasks.core.recipe import load_recipe
    from tasks.core.store import ArtifactStore

    recipe = load_recipe(args.recipe, args.overrides)
    plan_run(recipe, ArtifactStore(home_of(args)))  # the store: a recipe may chain on an artifact id in it
    quiet_user_errors()
    with temporary_server():
        print(data_preview(recipe, home=home_of(args)))
    return 0


def templates(args: argparse.Namespace) -> int:
    from tasks.templates.show import list_templates, render_sample

    if args.templates_command == "show":
        tokenizer = None
        if args.model:
            from transformers import AutoTokenizer

            from tasks.core.errors import ModelError

            try:
                tokenizer = AutoTokenizer.from_pretrained(args.model)
            except (OSError, ValueError) as exc:
                raise ModelError(f"--model {args.model}: no tokenizer loads from it ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:160]})") from None
        print(render_sample(args.name, tokenizer, tools=args.tools or args.tool_format is not None,
                            tool_format=args.tool_format))
        return 0
    for name, description in list_templates():
        print(f"{name:<16} {description}")
    return 0


def run(args: argparse.Namespace) -> int:
    from tasks.core.errors import RecipeError
    from tasks.core.recipe import load_recipe
    from tasks.core.store import ArtifactStore

    if args.parallel is not None and args.parallel < 1:
        raise RecipeError(f"--parallel {args.parallel}: give at least 1")
    if args.dry_run:
        print(dry_run(load_recipe(args.recipe, args.overrides), home_of(args)))
        return 0
    from flows.prefect_server import background_server

    with background_server() as server:  # it boots while the recipe is read and planned and MLflow opened
        recipe = load_recipe(args.recipe, args.overrides)
        from flows.finetune import run_finetune
        from flows.plan import plan_run
        from tasks.core import tracking

        plan_run(recipe, ArtifactStore(home_of(args)))  # recipe and data-path mistakes fail here, before Prefect
        tracking.open_store()
        if not args.debug:
            quiet_user_errors()
        with server.connected():
            summary = run_finetune(recipe, home=home_of(args), parallel=args.parallel,
                                   experiment=args.experiment or Path(args.recipe).stem)
    print(summary.table())
    return 0


def export_command(args: argparse.Namespace) -> int:
    from flows.export import export_model
    from flows.plan import plan_export
    from flows.prefect_server import temporary_server
    from tasks.core.recipe import load_recipe
    from tasks.core.store import ArtifactStore

    recipe = load_recipe(args.recipe, args.overrides)
    plan_export(recipe, ArtifactStore(home_of(args)))
    quiet_user_errors()
    with temporary_server():
        print(f"exported to {export_model(recipe, home=home_of(args))}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from flows.finetune import run_finetune
    from flows.plan import plan_run
    from flows.prefect_server import temporary_server
    from flows.sources import source_recipe
    from tasks.core.errors import RecipeError
    from tasks.core.store import ArtifactStore

    recipe = source_recipe(args.source, [*args.overrides, "do_eval=false"])  # the exam only, not ROUGE
    if not recipe.evaluation.task:
        raise RecipeError("tunefactory eval needs an exam: --set task=<exam>_<split> (e.g. pystdlib_test)")
    plan_run(recipe, ArtifactStore(home_of(args)))
    quiet_user_errors()
    with temporary_server():
        summary = run_finetune(recipe, home=home_of(args), experiment=args.experiment or Path(args.source).stem)
    for label, folder in summary.artifacts.items():
        if label.startswith("exam["):
            print(f"{label}\n{(Path(folder) / 'report.md').read_text()}")
    print(summary.table())
    return 0


def chat_command(args: argparse.Namespace) -> int:
    from flows.chat import chat_loop
    from flows.serving import engine_for

    engine = engine_for(args.source, args.overrides, home_of(args), args.template, args.adapter)
    chat_loop(engine, sys.stdin, sys.stdout, system=args.system, max_tokens=args.max_tokens,
              temperature=args.temperature)
    return 0


def api_command(args: argparse.Namespace) -> int:
    from flows.api import Limits, serve_api
    from flows.serving import engine_for

    engine = engine_for(args.source, args.overrides, home_of(args), args.template, args.adapter)
    limits = Limits(max_tokens=args.max_tokens_limit, max_request_bytes=args.max_request_bytes,
                    max_concurrency=args.max_concurrency)
    print(f"serving '{engine.name}' on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve_api(engine, args.host, args.port, args.api_key, limits)
    return 0


def retune_command(args: argparse.Namespace) -> int:
    from flows.plan import plan_run
    from flows.prefect_server import temporary_server
    from flows.retune import retune
    from tasks.core.recipe import load_recipe
    from tasks.core.store import ArtifactStore

    recipe = load_recipe(args.recipe, args.overrides)
    plan_run(recipe, ArtifactStore(home_of(args)))
    quiet_user_errors()
    with temporary_server():
        decision = retune(recipe, model_name=args.model_name, metric=args.metric, margin=args.margin,
                          home=home_of(args), experiment=Path(args.recipe).stem)
    print(f"{decision.decision}: {decision.reason}")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    from flows.deployments import RECIPES, pin_locations, serve

    home, uri = pin_locations()
    print(f"store: {home}\nMLflow: {uri}", file=sys.stderr)
    serve(Path(args.recipes) if args.recipes else RECIPES, limit=args.limit, retune_schedule=args.retune_schedule)
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from flows.compare import compare

    result = compare(args.experiment, args.metric, args.last, Path(args.out).resolve())
    print(f"experiment '{result.experiment}', {len(result.runs)} runs\n")
    print(result.table)
    print(f"\nfigure: {result.figure}  (also in MLflow run {result.mlflow_run_id})")
    return 0


def runs_command(args: argparse.Namespace) -> int:
    from flows.housekeeping import recent_runs

    print(recent_runs(args.last))
    return 0


def gc_command(args: argparse.Namespace) -> int:
    from flows.housekeeping import collect_garbage
    from tasks.core.store import ArtifactStore

    result = collect_garbage(ArtifactStore(home_of(args)), args.keep_last, args.dry_run, args.force, args.staging)
    for artifact_id in result.removed:
        print(f"{'would delete' if args.dry_run else 'deleted'} {artifact_id}")
    for artifact_id in result.in_use:
        print(f"kept {artifact_id} (a running build holds it)")
    print(result.summary(args.dry_run))
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from flows.verify import verify_store
    from tasks.core.recipe import load_recipe
    from tasks.core.store import ArtifactStore

    recipe = load_recipe(args.recipe, args.overrides) if args.recipe else None
    result = verify_store(ArtifactStore(home_of(args)), recipe)
    for artifact_id in result.damaged:
        print(f"damaged {artifact_id}")
    print(result.summary())
    return 1 if result.damaged else 0


def interrupt(signum, frame) -> None:
    """SIGTERM outside a flow run ends the command like Ctrl-C (inside one, Prefect turns it into a
    TerminationSignal); either way the `finally` blocks run and stop what the command started."""
    raise KeyboardInterrupt


def quiet_imported_libraries() -> None:
    """datasets and transformers read their progress-bar switches (QUIET_DEFAULTS) when first imported. Where
    main() runs in a process that has imported them already (Python use, the tests), set them directly."""
    datasets, transformers = sys.modules.get("datasets"), sys.modules.get("transformers")
    if datasets is not None and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"].upper() in \
            datasets.config.ENV_VARS_TRUE_VALUES:
        datasets.disable_progress_bars()
    if transformers is not None and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"].upper() in \
            transformers.utils.ENV_VARS_TRUE_VALUES:
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)
    args = parser().parse_args(argv)
    if not args.debug:
        for name in NOISY_LOGGERS:  # some may be imported already, so set levels, not only env
            logging.getLogger(name).setLevel(logging.WARNING)
        for name in SILENCED_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    quiet_imported_libraries()
    from prefect.exceptions import TerminationSignal

    from tasks.core.errors import TuneFactoryError

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)
    commands = {"run": run, "data": preview_data, "templates": templates, "retune": retune_command,
                "export": export_command, "eval": eval_command, "chat": chat_command, "api": api_command,
                "serve": serve_command, "compare": compare_command, "runs": runs_command, "gc": gc_command,
                "verify": verify_command}
    try:
        return commands[args.command](args)
    except TuneFactoryError as exc:
        if args.debug:
            raise
        print(f"tunefactory: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, TerminationSignal):
        print("tunefactory: interrupted; finished stages are kept, training resumes on the next run", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0


def entry() -> None:
    """The `tunefactory` command: main(), then what the interpreter does on exit up to its own teardown, then a
    prompt exit. That teardown (of the modules and native state of torch, transformers, Prefect and MLflow)
    took 2-3 s here on every command and does nothing a user needs: files are closed by then, and the exit
    steps that matter run as they would, in the interpreter's order: threading's exit hooks (thread pools
    finish their work and stop), the joins of worker threads, then the exit handlers (logging's, MLflow's,
    Prefect's)."""
    import atexit
    import contextlib
    import threading

    from tasks.core.memory import share_one_malloc_arena

    share_one_malloc_arena()  # before any thread allocates
    code = main()
    shutdown = getattr(threading, "_shutdown", None)  # CPython's own first exit step; a private name
    if shutdown is None:
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that stopped early, a closed stream
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
