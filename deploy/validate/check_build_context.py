#!/usr/bin/env python3
"""Checks that every `COPY` source of a Dockerfile exists and is not
excluded from the build context by .dockerignore.

    check_build_context.py DOCKERFILE DOCKERIGNORE
    check_build_context.py DOCKERFILE DOCKERIGNORE --copy-stage NAME DIR

Patterns are matched the way Docker does for the common cases: against
the path and each of its parent directories, `**/` matching any depth.
Prints one line per source; exits 1 if any is missing or excluded.

With --copy-stage, also lays out in DIR what the COPY instructions of
stage NAME put under its WORKDIR, so that the build can be tried on
exactly those files without Docker.
"""

import fnmatch
import os
import shutil
import sys


def patterns(path):
    result = []
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            result.append(line.lstrip("/").rstrip("/"))
    return result


def excluded_by(src, ignore):
    parts = src.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in ignore:
        if pattern.startswith("!"):
            continue  # no re-inclusions in popgate's .dockerignore
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or fnmatch.fnmatchcase(prefix, pattern.replace("**/", "")):
                return pattern
    return None


def copy_sources(dockerfile):
    for line in open(dockerfile):
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        for word in words[1:-1]:
            if not word.startswith("--"):
                yield os.path.normpath(word)


def copy_stage(dockerfile, stage, out):
    """Replays the stage's `COPY SRC... DEST` (DEST relative to WORKDIR)."""
    in_stage = False
    for line in open(dockerfile):
        words = line.split()
        if not words:
            continue
        if words[0] == "FROM":
            in_stage = len(words) >= 4 and words[-2].upper() == "AS" and words[-1] == stage
        elif in_stage and words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            args = [w for w in words[1:] if not w.startswith("--")]
            sources, dest = args[:-1], args[-1]
            for src in sources:
                target = os.path.join(out, dest, os.path.basename(src)) if dest.endswith("/") or len(sources) > 1 else os.path.join(out, dest)
                os.makedirs(os.path.dirname(os.path.normpath(target)), exist_ok=True)
                if os.path.isdir(src):
                    shutil.copytree(src, target, dirs_exist_ok=True)
                else:
                    shutil.copy2(src, target)


def main():
    dockerfile, dockerignore = sys.argv[1], sys.argv[2]
    if len(sys.argv) == 6 and sys.argv[3] == "--copy-stage":
        copy_stage(dockerfile, sys.argv[4], sys.argv[5])
    ignore = patterns(dockerignore)
    bad = False
    for src in copy_sources(dockerfile):
        pattern = excluded_by(src, ignore)
        if not os.path.exists(src):
            print(f"FAIL {src}: does not exist")
            bad = True
        elif pattern:
            print(f"FAIL {src}: excluded by .dockerignore pattern {pattern!r}")
            bad = True
        else:
            print(f"ok {src}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
