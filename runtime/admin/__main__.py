"""`python -m runtime.admin --kit KIT_DIR [-c COMMAND] [--json]`: what an admin kit's fl_admin.sh runs.

Without -c it is interactive, with history and tab completion; with -c it runs one command and exits
0 on success, 1 on failure (one line on stderr)."""

from __future__ import annotations

import argparse
import asyncio
import cmd
import sys
from pathlib import Path

from rich.console import Console

from ..errors import FedkitError
from .client import AdminClient
from .console import USAGE, AdminConsole


async def one_shot(kit: Path, line: str, as_json: bool) -> int:
    async with AdminClient(kit) as client:
        await AdminConsole(client, Console(), as_json).run_line(line)
    return 0


class _Shell(cmd.Cmd):
    def __init__(self, kit: Path, as_json: bool):
        super().__init__()
        self._loop = asyncio.new_event_loop()
        self._client = AdminClient(kit)
        self._loop.run_until_complete(self._client.__aenter__())
        self._console = AdminConsole(self._client, Console(), as_json)
        cfg = self._client.config
        self.prompt = f"{cfg.name}@{cfg.project}> "
        self.intro = f"fedkit admin console: {cfg.name} ({cfg.role}) on {cfg.server_host}:{cfg.admin_port}. " \
                     "Type 'help', 'help COMMAND' or 'bye'."
        self.history = Path.home() / ".fedkit_admin_history"

    def completenames(self, text: str, *ignored: object) -> list[str]:
        return [c for c in [*self._console.commands, "bye"] if c.startswith(text)]

    def do_bye(self, arg: str) -> bool:
        return True

    do_EOF = do_bye

    def emptyline(self) -> bool:
        return False

    def default(self, line: str) -> bool:
        try:
            self._loop.run_until_complete(self._console.run_line(line))
        except FedkitError as e:
            print(f"error: {e}", file=sys.stderr)
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
        if shell.history.exists():
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl_admin.sh", epilog="commands:\n  " + "\n  ".join(USAGE.values()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kit", type=Path, required=True)
    parser.add_argument("-c", "--command", help="run one command and exit")
    parser.add_argument("--json", action="store_true", help="print results as JSON (for scripts)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command:
            return asyncio.run(one_shot(args.kit.resolve(), args.command, args.json))
        return interactive(args.kit.resolve(), args.json)
    except FedkitError as e:
        if args.debug:
            raise
        print(f"fl_admin: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
