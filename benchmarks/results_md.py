"""Shared by the benchmark scripts: write one section of docs/RESULTS.md between markers.

Each script owns the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; the rest of
the file is left as it is, so scripts can run in any order and never overwrite each other.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
HEADER = ("# Measured results\n\nEvery section below is written by the script it names; do not "
          "edit by hand (rerun the script).\n")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (one JSON object a line); [] when it does not exist."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def write_jsonl(records: list[dict], path: Path) -> list[dict]:
    """Replace ``path`` with ``records`` atomically (a temporary named after this process, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return records


def replace_jsonl(record: dict, path: Path, same: Callable[[dict], bool]) -> list[dict]:
    """Add ``record`` to the file in place of the records ``same`` picks, and return all records. The file
    is read again just before the write, so that records another process stored meanwhile are kept."""
    return write_jsonl([r for r in read_jsonl(path) if not same(r)] + [record], path)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "cpu family", "model"); empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_tag() -> str:
    """A short name for this CPU type: vendor and model words, family and model numbers (``amd-epyc-f26m2``).
    Training runs of one command agree bit for bit only on one CPU type and thread count."""
    info = _cpuinfo()
    name = info.get("model name", "cpu").lower()
    words = [w for w in re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*", " ", name).split() if w.isalnum()][:2]
    family, model = info.get("cpu family"), info.get("model")
    return "-".join(words or ["cpu"]) + (f"-f{family}m{model}" if family and model else "")


def machine(threads: bool = True) -> str:
    """One line naming the machine the numbers come from (with the CPU's family and model: two machines
    sold under one name can differ)."""
    info = _cpuinfo()
    cpu = info.get("model name") or platform.processor() or platform.machine()
    if info.get("cpu family") and info.get("model"):
        cpu += f" (family {info['cpu family']}, model {info['model']})"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    used = f" ({torch.get_num_threads()} threads)" if threads else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}{used}, {gpu}"


def git_commit() -> str:
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "tshsr", "app.py", "train.py"],
                               stderr=subprocess.DEVNULL).returncode
        return head + ("+uncommitted changes" if dirty == 1 else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two scripts writing at once never share a temporary
    tmp.write_text(text)
    os.replace(tmp, path)
