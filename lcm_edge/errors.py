"""Typed errors. Every error names what was wrong and how to fix it.

Users catch `LcmEdgeError` for everything this package raises on purpose; the narrower
classes let an app react (re-export a bundle, ask for another prompt, ...).
"""

from __future__ import annotations

import sys
from typing import Callable


class LcmEdgeError(Exception):
    """Base class of every error lcm_edge raises on purpose."""

    def _explain(self, subject: str, problem: str, fix: str) -> None:
        """The message shape of the errors that name what, why and how to fix: 'SUBJECT: PROBLEM. Fix: FIX'."""
        self.problem = problem
        self.fix = fix
        super().__init__(f"{subject}: {problem}. Fix: {fix}")


class InvalidArgumentError(LcmEdgeError, ValueError):
    """A caller-supplied argument cannot be used. `argument` names it."""

    def __init__(self, argument: str, problem: str, fix: str):
        self.argument = argument
        self._explain(argument, problem, fix)


class PathError(LcmEdgeError):
    """A file or folder cannot be used. `path` names it, `problem` says why, `fix` what to do."""

    def __init__(self, path: str, problem: str, fix: str):
        self.path = str(path)
        self._explain(self.path, problem, fix)


class BundleError(PathError):
    """A bundle on disk is unusable. `path` names the offending file or folder."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """The bundle folder, or a file the manifest lists, does not exist."""


class BundleFormatError(BundleError):
    """The manifest is unreadable, has an unknown format version, or misses keys."""


class BundleIntegrityError(BundleError):
    """A file's size or sha256 differs from the manifest (truncated, corrupt or altered)."""


class BackendError(LcmEdgeError, ValueError):
    """Unknown backend, device or execution provider, or one that is not installed."""


class GraphInputError(LcmEdgeError, ValueError):
    """Arrays handed to a graph do not match the graph's own input metadata."""


class InferenceError(LcmEdgeError, RuntimeError):
    """A runtime failed while running a graph (out of memory, a lost device, a runtime bug); `graph` names it."""

    def __init__(self, graph: str, problem: str, fix: str):
        self.graph = graph
        self._explain(graph, problem, fix)


class OutputWriteError(LcmEdgeError, OSError):
    """Writing an output (a bundle, a clip) failed: disk full, read-only folder, no permission. `path` names
    the target, which is left as it was; `errno` is the operating system's."""

    def __init__(self, path: str, cause: OSError):
        self.path = str(path)
        super().__init__(f"{self.path}: could not be written ({cause.strerror or cause}). Fix: free disk space, "
                         "or write to a folder you can write to; nothing was written under this name")
        self.errno = cause.errno


class ParityError(LcmEdgeError):
    """A numerical gate failed. `failures` lists every failing output."""

    def __init__(self, stage: str, failures: list[str]):
        self.stage = stage
        self.failures = list(failures)
        lines = "\n  ".join(self.failures)
        super().__init__(f"parity gate '{stage}' failed for {len(self.failures)} output(s):\n  {lines}")


class GenerationCancelled(LcmEdgeError):
    """The caller's cancel event was set while a generation was running."""

    def __init__(self, stage: str):
        self.stage = stage
        super().__init__(f"generation cancelled during {stage}")


class MissingExtraError(LcmEdgeError, ImportError):
    """An optional dependency group is not installed."""

    def __init__(self, feature: str, extra: str, missing: str):
        self.extra = extra
        super().__init__(
            f"{feature} needs the '{missing}' package. Fix: pip install 'lcm-edge[{extra}]'"
        )


def run_command(command: Callable[[], int], *, interrupted: str = "interrupted") -> int:
    """A CLI's exit code for `command`: 2 with the error's own words for an LcmEdgeError (no traceback: it
    names the argument and the fix), 130 with `interrupted` on Ctrl-C; anything else is a bug and propagates."""
    try:
        return command()
    except LcmEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
