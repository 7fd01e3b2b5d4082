#!/usr/bin/env python3
"""Writes the hand-made seeds of the session and sasl targets into
fuzz/seeds/<target>/ (which also holds, for every target, the corpus of the
long run minimised with `-merge=1 -use_counters=0 -max_len=256` (session:
512): the same coverage edges in a few hundred small files): the client side of every transcript in
src/pop3/session_tests.rs (a new seed at each greeting; continued runs of the
same harness stay in the same seed), plus one session per SASL mechanism,
DELE/RSET/QUIT and STLS paths. Run from anywhere; re-running rewrites them.
"""
import hashlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"

# The session target's 32-octet header, field by field (see Settings in
# fuzz_targets/session.rs): mechanisms (all four), login permitted, no STLS,
# login after TLS, max failed logins 3, messages 0 1 2 4 6, five of them,
# logins all succeed, no fetch fails, UPDATE succeeds, 1024-octet chunks,
# 7-octet body chunks.
def header(mechanisms=0x0F, login=1, stls=0, tls_login=1, failed=2, logins=(0, 0, 0, 0), fetch=0,
           update_fails=0, chunks=(0, 0, 0, 0), count=5):
    h = bytes([mechanisms, login, stls, tls_login, failed, 0, 1, 2, 4, 6, count, *logins, fetch, update_fails,
               *chunks, 7])
    return h + bytes(32 - len(h))

# Placeholders of the Rust transcripts (format! arguments), as macros.
MACROS = {
    "{good}": "{user=alice%01auth=Bearer good-token%01%01}",
    "{bad}": "{n,a=alice,%01host=x%01auth=Bearer expired%01%01}",
}


def transcripts():
    text = (ROOT / "src" / "pop3" / "session_tests.rs").read_text()
    seeds, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("S: +OK popgate ready"):
            current = []
            seeds.append(current)
        elif line.startswith("C: ") and current is not None:
            command = line[3:]
            for k, v in MACROS.items():
                command = command.replace(k, v)
            current.append(command)
    return ["\r\n".join(s) + "\r\n" for s in seeds if s]


SESSIONS = [
    "USER alice\r\nPASS s3cr3t\r\nSTAT\r\nLIST\r\nRETR 1\r\nTOP 2 1\r\nDELE 1\r\nDELE 3\r\nRSET\r\nDELE 2\r\nLIST\r\nQUIT\r\n",
    "AUTH PLAIN {%00alice%00s3cr3t}\r\nDELE 1\r\nQUIT\r\n",
    "AUTH PLAIN\r\n{alice%00alice%00s3cr3t}\r\nLIST 1\r\nDELE 1\r\nRSET\r\nDELE 2\r\nQUIT\r\n",
    "AUTH LOGIN\r\n{alice}\r\n{s3cr3t}\r\nUIDL\r\nDELE 4\r\nQUIT\r\n",
    "AUTH LOGIN {alice}\r\n{s3cr3t}\r\nTOP 1 0\r\nQUIT\r\n",
    "AUTH XOAUTH2 {user=alice%01auth=Bearer tok%01%01}\r\nSTAT\r\nDELE 5\r\nQUIT\r\n",
    "AUTH OAUTHBEARER {n,a=alice,%01host=x%01auth=Bearer tok%01%01}\r\n=\r\nAUTH XOAUTH2\r\n{user=alice%01auth=Bearer t%01%01}\r\nDELE 1\r\nQUIT\r\n",
    "AUTH PLAIN {%00alice%00bad%0Dpass}\r\nUSER al%00ice\r\nPASS x\r\nUSER alice\r\nPASS s3cr3t\r\nQUIT\r\n",
    "CAPA\r\nSTLS\r\nUSER alice\r\nPASS s3cr3t\r\nCAPA\r\nLIST 2\r\nDELE 2\r\nQUIT\r\n",
    "USER alice\nPASS s3cr3t\nDELE 1\nRETR 1\nTOP 2 3\nRETR 2\nLIST 99999999999\nQUIT\n",
]


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)


def main():
    for i, script in enumerate(transcripts() + SESSIONS):
        write("session", f"seed{i:02}", header() + script.encode())
    # The same sessions with failing logins, fetches and UPDATE, STLS
    # offered, and one-octet chunks.
    write("session", "fail", header(logins=(4, 0, 5, 0), fetch=0x05, update_fails=1) + SESSIONS[0].encode())
    write("session", "oauthfail", header(logins=(4, 0, 6, 0)) + SESSIONS[6].encode())
    write("session", "stls", header(stls=1, login=0, chunks=(1, 2, 3, 250)) + SESSIONS[8].encode())
    write("session", "tiny", header(chunks=(1, 1, 1, 1)) + SESSIONS[2].encode())
    # sasl: a mechanism octet, then SASL payloads (arbitrary splits the rest
    # in two by a length it reads from the last octet; the fuzzer varies it).
    for i, s in enumerate([b"\x00alice\x00s3cr3t", b"user=a\x01auth=Bearer t\x01\x01", b"n,a=a,\x01auth=Bearer t\x01\x01"]):
        write("sasl", f"seed{i}", bytes([i]) + s)


if __name__ == "__main__":
    main()
