"""Open the study store in optuna-dashboard, with the artifact store wired in.

    python -m kdig_study.dashboard                 # sqlite:///storage/kdig.db, port 8080
    python -m kdig_study.dashboard --storage postgresql+psycopg://host/db --port 8081
"""

from __future__ import annotations

import argparse
import socket

from kdig_study.cli import Parser, run
from kdig_study.errors import KdigError


def _check_port(host: str, port: int) -> None:
    """One line instead of the server's traceback when the port is taken."""
    if not 0 < port < 65536:
        raise KdigError(f"--port {port}: allowed: 1..65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise KdigError(f"cannot serve on {host}:{port}: {e.strerror or e} (another "
                            f"dashboard?); choose another --port") from None


def main() -> int:
    p = Parser(prog="python -m kdig_study.dashboard", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", default=None, help="default: sqlite:///storage/kdig.db")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args()
    from optuna_dashboard import run_server

    from kdig_study.store import artifact_store, artifacts_dir, default_url, open_storage

    url = args.storage or default_url()
    storage = open_storage(url, existing=True)
    _check_port(args.host, args.port)
    print(f"optuna-dashboard on http://{args.host}:{args.port} for {url} "
          f"(artifacts: {artifacts_dir()}); Ctrl-C stops it", flush=True)
    run_server(storage, host=args.host, port=args.port, artifact_store=artifact_store())
    return 0


if __name__ == "__main__":
    run(main)
