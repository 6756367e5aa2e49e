"""Start `localdisk serve` by forking a process that has already imported it: for the crash loop under UML.

Under User-Mode Linux starting Python and importing localdisk, grpclib and friends takes tens of seconds, so a
crash loop that execs a fresh server after every SIGKILL cannot reach 100 kills in minutes. This zygote imports
everything `localdisk serve` needs once, does nothing else (no event loop, no pool opened, no file of localdisk's
touched), and forks one child per request; the child starts a session of its own and runs the very same
`localdisk.cli` entry point with the serve arguments. A killed child loses everything it held in memory exactly as
an exec'd server would; the next one starts from what is on disk.

Protocol on stdin/stdout, one line each: `spawn <log file>` answers the child's pid.
"""

from __future__ import annotations

import gc
import os
import signal
import sys


def main() -> None:
    serve_args = sys.argv[1:]
    # Everything the serve command imports lazily, so no child pays for it.
    import anyio  # noqa: F401
    import grpclib.server  # noqa: F401

    import localdisk.backends.fake
    import localdisk.backends.lvm
    import localdisk.backends.partition
    import localdisk.cli
    import localdisk.config
    import localdisk.csi.server
    import localdisk.k8s.client
    import localdisk.logs
    import localdisk.manager
    import localdisk.metrics  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel: no zombies to wait for
    # Keep the collector off the imported objects, so children do not copy every page the collector would touch
    # (under UML each copy-on-write fault is expensive).
    gc.freeze()
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, log_path = line.strip().partition(" ")
        if command != "spawn":
            print(f"error: unknown command {command!r}", flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            _child(log_path, serve_args)
        print(pid, flush=True)


def _child(log_path: str, serve_args: list[str]) -> None:
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server waits for its own commands
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.argv = ["localdisk", "serve", *serve_args]
        localdisk_main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def localdisk_main() -> None:
    from localdisk.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
