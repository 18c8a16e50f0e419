"""`python -m runtime.admin --kit KIT_DIR [-c COMMAND] [--json]`: what an admin kit's fl_admin.sh runs.

Without -c it is interactive, with history and tab completion; with -c it runs one command and exits
0 on success, 1 on failure (denied, refused, unreachable) and 2 on a command line that does not parse,
with one line on stderr."""

from __future__ import annotations

import argparse
import asyncio
import cmd
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

# gRPC's C core logs failed TLS handshakes to stderr on its own; the console says it in one line instead.
# Set before grpc is imported (by .client), and only where the caller has not chosen a level.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from rich.console import Console  # noqa: E402

from ..errors import FedkitError  # noqa: E402
from ..plain_text import shown  # noqa: E402
from ..procs import private_umask  # noqa: E402
from .client import AdminClient  # noqa: E402
from .console import USAGE, AdminConsole, UsageError  # noqa: E402
from .sanitize import SafeConsole  # noqa: E402

EXIT_FAILED = 1
EXIT_USAGE = 2


def _console() -> Console:
    """Rich output, with markup off: job names, overrides (`meta.sites=[site-1]`) and errors print as they
    are. Piped into a file or another program, wide enough that tables are not cut to 80 columns."""
    width = None if sys.stdout.isatty() else 200
    return SafeConsole(width=width, markup=False, highlight=False)


async def one_shot(kit: Path, line: str, as_json: bool) -> int:
    async with AdminClient(kit) as client:
        await AdminConsole(client, _console(), as_json).run_line(line)
    return 0


class _Shell(cmd.Cmd):
    def __init__(self, kit: Path, as_json: bool):
        super().__init__()
        self._loop = asyncio.new_event_loop()
        self._client = AdminClient(kit)
        self._loop.run_until_complete(self._client.__aenter__())
        self._console = AdminConsole(self._client, _console(), as_json)
        self._as_json = as_json
        cfg = self._client.config
        self.prompt = f"{cfg.name}@{cfg.project}> "
        self.intro = f"fedkit admin console: {cfg.name} ({cfg.role}) on {cfg.server_host}:{cfg.admin_port}. " \
                     "Type 'help', 'help COMMAND' or 'bye'."
        if as_json:  # for a script: stdout holds only the JSON answers, one per line it sends
            self.prompt, self.intro = "", None
        self.history = Path.home() / ".fedkit_admin_history"

    def completenames(self, text: str, *ignored: object) -> list[str]:
        return [c for c in [*self._console.commands, "bye"] if c.startswith(text)]

    def complete_help(self, text: str, *ignored: object) -> list[str]:
        return [c for c in self._console.commands if c.startswith(text)]

    def completedefault(self, text: str, *ignored: object) -> list[str]:
        """Arguments: the fixed words commands take (site names and job ids are typed)."""
        return [w for w in ("server", "client", "--set") if w.startswith(text)]

    def do_bye(self, arg: str) -> bool:
        return True

    do_EOF = do_bye

    def emptyline(self) -> bool:
        return False

    def default(self, line: str) -> bool:
        try:
            self._loop.run_until_complete(self._console.run_line(line))
        except FedkitError as e:  # its text may hold what a job shaped: escaped, never obeyed by the terminal
            print(f"error: {shown(e, keep=chr(10))}", file=sys.stderr)
            if self._as_json:  # a script feeding lines reads stdout: one JSON object per line, errors too
                code = EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILED
                print(json.dumps({"error": " ".join(str(e).split()), "exit_code": code}), flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops the command (e.g. a wait_job), not the console
            print("interrupted", file=sys.stderr)
        return False

    def do_help(self, arg: str) -> None:
        self.default(f"help {arg}".strip())

    def close(self) -> None:
        self._loop.run_until_complete(self._client.__aexit__(None, None, None))
        self._loop.close()


def interactive(kit: Path, as_json: bool) -> int:
    try:
        import readline

        shell = _Shell(kit, as_json)
        with contextlib.suppress(OSError):  # an unreadable history (a folder, another user's file): start without
            readline.read_history_file(shell.history)
    except ImportError:
        shell = _Shell(kit, as_json)
    try:
        shell.cmdloop()
    finally:
        try:
            import readline

            readline.write_history_file(shell.history)
        except (ImportError, OSError):
            pass
        shell.close()
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors, under --json, are one JSON object on stdout too (a script reads stdout:
    `--json --port abc` left it empty)."""

    def __init__(self, json_errors: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._json_errors = json_errors

    def error(self, message: str) -> NoReturn:
        if not self._json_errors:
            super().error(message)
        text = f"{message} (fl_admin.sh -h lists the options)"
        print(f"fl_admin: {text}", file=sys.stderr)
        print(json.dumps({"error": text, "exit_code": EXIT_USAGE}), flush=True)
        sys.exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser("--json" in (sys.argv[1:] if argv is None else argv), prog="fl_admin.sh",
                     epilog="commands:\n  " + "\n  ".join(USAGE.values()),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kit", type=Path, required=True)
    parser.add_argument("mode", nargs="?", choices=["dashboard"],
                        help="dashboard: serve the study dashboard on 127.0.0.1 (docs/dashboard.md)")
    parser.add_argument("--port", type=int, default=0, help="dashboard: port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--open", action="store_true", help="dashboard: open it in the web browser")
    parser.add_argument("-c", "--command", help="run one command and exit")
    parser.add_argument("--json", action="store_true", help="print results as JSON (for scripts)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    private_umask()  # workspace, logs, models and audit trail: owner only
    try:
        if args.mode == "dashboard":
            from .dashboard.serve import serve  # Starlette and uvicorn load only for the dashboard

            return asyncio.run(serve(args.kit.resolve(), args.port, args.open))
        if args.command is not None:
            if not args.command.strip():  # -c '' from a script with an empty variable: say so, do not go interactive
                raise UsageError('-c needs a command, e.g. -c "check_status server"; -c help lists them')
            return asyncio.run(one_shot(args.kit.resolve(), args.command, args.json))
        return interactive(args.kit.resolve(), args.json)
    except FedkitError as e:
        if args.debug:
            raise
        code = EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILED
        message = " ".join(str(e).split())
        print(f"fl_admin: {shown(message)}", file=sys.stderr)  # what a job shaped: escaped, never obeyed
        if args.json:  # a script reads stdout: every outcome is one JSON object there
            print(json.dumps({"error": message, "exit_code": code}), flush=True)
        return code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
