"""What a directory tree holds, to prove a command left a user's files untouched: every path
(hidden ones too) with its content hash, link target or "dir". Shared by the output,
interrupt and file-writing tests (tests/ is on sys.path through its conftest)."""
import hashlib
import os


def snapshot(*roots, relative: bool = False) -> dict:
    """{path: sha256 | "-> target" | "dir"} under each root; paths relative to their root
    when ``relative``."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                key = os.path.relpath(p, root) if relative else p
                if os.path.islink(p):
                    out[key] = "-> " + os.readlink(p)
                elif os.path.isfile(p):
                    out[key] = hashlib.sha256(open(p, "rb").read()).hexdigest()
                else:
                    out[key] = "dir"
    return out
