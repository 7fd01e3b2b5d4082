#!/usr/bin/env python3
"""Which functions a fuzz target's corpus reaches, and how often.

    cargo +nightly fuzz coverage --sanitizer none --debug-assertions TARGET fuzz/corpus/TARGET fuzz/seeds/TARGET
    fuzz/coverage.py TARGET [NAME-SUBSTRING...]

Reads fuzz/coverage/TARGET/coverage.profdata and the instrumented binary
through `llvm-cov export` (rustup component llvm-tools-preview, nightly) and
prints, for every function of src/ whose "file:line name" contains one of
the substrings (default: all), its execution count; 0 means never reached
(generic functions and closures count every instance).
"""
import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def function_name(path, line, cache={}):
    """The name of the function starting at this source line (the mangled
    names are Rust v0; reading the source needs no demangler)."""
    if path not in cache:
        with open(path, encoding="utf-8") as f:
            cache[path] = f.read().splitlines()
    lines = cache[path]
    for text in lines[line - 1:line + 2]:
        m = re.search(r"\bfn\s+(\w+)", text)
        if m:
            return m.group(1)
    return "{closure}"


def main():
    target, wanted = sys.argv[1], sys.argv[2:]
    llvm = glob.glob(os.path.expanduser("~/.rustup/toolchains/nightly-*/lib/rustlib/*/bin/llvm-cov"))[0]
    binary = glob.glob(os.path.join(ROOT, "**/coverage/*/release", target), recursive=True)
    binary = [b for b in binary if os.path.isfile(b)][0]
    profile = os.path.join(ROOT, "fuzz", "coverage", target, "coverage.profdata")
    out = subprocess.run([llvm, "export", "-summary-only=false", "-skip-expansions", "-instr-profile", profile, binary],
                         check=True, capture_output=True, text=True).stdout
    counts = {}
    src = os.path.join(ROOT, "src") + os.sep
    for data in json.loads(out)["data"]:
        for f in data["functions"]:
            path = os.path.normpath(f["filenames"][0])
            if not path.startswith(src) or not f["regions"]:
                continue
            line = f["regions"][0][0]
            name = f"{os.path.relpath(path, ROOT)}:{line} {function_name(path, line)}"
            if wanted and not any(w in name for w in wanted):
                continue
            counts[name] = counts.get(name, 0) + f["count"]
    for name, count in sorted(counts.items()):
        print(f"{count:>12}  {name}")


if __name__ == "__main__":
    main()
