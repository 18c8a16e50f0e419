"""`python -m runtime.server --kit KIT_DIR`: what the server kit's start.sh runs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ..errors import FedkitError
from ..procs import private_umask
from .handshake_watch import StderrWatch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedkit-server")
    parser.add_argument("--kit", type=Path, required=True, help="the unzipped server startup kit")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    private_umask()  # workspace, logs, models and audit trail: owner only
    handshakes = StderrWatch.install()  # refused TLS handshakes with their peer; before grpc is imported
    try:
        from .app import serve

        asyncio.run(serve(args.kit.resolve(), debug=args.debug, handshakes=handshakes), debug=args.debug)
    except FedkitError as e:
        print(f"fedkit server: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        handshakes.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
