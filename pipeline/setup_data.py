"""Data files rag4dmc needs beside its code, where they are installed, and the one command that fetches them.

NIQE's natural-scene model (``niqe_pris_params.npz``, from PyPI's ``basicsr==1.4.2`` sdist, Apache-2.0) is
not on PyPI as a file of its own and pyiqa would download it at run time, which fails offline. ``rag4dmc
setup`` fetches it once, at set-up time, through pip (the package registry) and installs it where
:func:`niqe_params_path` finds it without any flag:

1. the config key ``selection.niqe_params`` (``--niqe-params``), when set;
2. the environment variable ``RAG4DMC_NIQE_PARAMS``;
3. the installed location ``<sys.prefix>/share/rag4dmc/niqe_pris_params.npz`` (the virtual environment);
4. the user's cache ``~/.cache/rag4dmc/niqe_pris_params.npz`` (where ``setup`` writes when 3 is read-only).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

NIQE_ENV = "RAG4DMC_NIQE_PARAMS"
NIQE_FILE = "niqe_pris_params.npz"
NIQE_SDIST = "basicsr==1.4.2"
NIQE_MEMBER = "basicsr/metrics/niqe_pris_params.npz"  # inside the sdist's top folder
NIQE_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
SETUP_COMMAND = "rag4dmc setup"


class NiqeParamsMissing(FileNotFoundError):
    """NIQE's parameter file is nowhere rag4dmc looks; the message says how to get it."""


def installed_locations() -> list[Path]:
    """Where an installed parameter file is looked for, in order (3. and 4. of the module docstring)."""
    return [Path(sys.prefix) / "share" / "rag4dmc" / NIQE_FILE, Path.home() / ".cache" / "rag4dmc" / NIQE_FILE]


def niqe_params_path(configured: str | None = None) -> str:
    """The NIQE parameter file to use: the config key, then ``$RAG4DMC_NIQE_PARAMS``, then the installed copy.

    A path that is given (key or variable) but missing is an error, not a reason to look further: the user
    asked for that file."""
    for given, what in ((configured, "selection.niqe_params (--niqe-params)"), (os.environ.get(NIQE_ENV), f"${NIQE_ENV}")):
        if given:
            if not Path(given).is_file():
                raise NiqeParamsMissing(f"NIQE parameters not found at {given!r}, given by {what}: point it at "
                                        f"{NIQE_FILE}, or unset it to use the copy `{SETUP_COMMAND}` installs")
            return str(given)
    for path in installed_locations():
        if path.is_file():
            return str(path)
    raise NiqeParamsMissing(
        f"NIQE parameters are not installed (looked in {', '.join(str(p) for p in installed_locations())}): run "
        f"`{SETUP_COMMAND}` once (it fetches {NIQE_SDIST}'s sdist from PyPI; `make env` runs it), or set "
        f"--niqe-params / ${NIQE_ENV} to {NIQE_FILE}, or rank images by cosine only with --image-quality none")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extract_niqe_params(sdist: Path, dest: Path) -> Path:
    """Copy the parameter file out of basicsr's sdist to ``dest`` (atomically), checking its sha256."""
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(NIQE_MEMBER)), None)
        if member is None:
            raise ValueError(f"{sdist} has no {NIQE_MEMBER}; is it {NIQE_SDIST}'s sdist?")
        data = tar.extractfile(member).read()
    if hashlib.sha256(data).hexdigest() != NIQE_SHA256:
        raise ValueError(f"{NIQE_MEMBER} in {sdist} does not have the expected sha256 {NIQE_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


def install_niqe_params(dest: Path | None = None, sdist: Path | None = None) -> Path:
    """Install NIQE's parameters (``rag4dmc setup``); a no-op when a verified copy is already there.

    ``sdist``: a downloaded ``basicsr-1.4.2.tar.gz``; None downloads it with pip (no build, no dependencies).
    ``dest``: None is the first writable installed location."""
    targets = [dest] if dest is not None else installed_locations()
    for path in targets:
        if path.is_file() and _sha256(path) == NIQE_SHA256:
            log.info("NIQE parameters already installed at %s", path)
            return path
    with tempfile.TemporaryDirectory(prefix="rag4dmc-setup-") as tmp:
        if sdist is None:
            # --no-build-isolation: pip reads the sdist's metadata without building an environment (basicsr's
            # build wants torch); PIP_CONFIG_FILE: a site constraints file must not veto the download.
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                   "--no-build-isolation", NIQE_SDIST, "-d", tmp]
            log.info("fetching %s's sdist from the package index: %s", NIQE_SDIST, " ".join(cmd))
            subprocess.run(cmd, check=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
            found = sorted(Path(tmp).glob("basicsr-*.tar.gz"))
            if not found:
                raise FileNotFoundError(f"pip download {NIQE_SDIST} left no sdist in {tmp}")
            sdist = found[0]
        errors = []
        for path in targets:
            try:
                return extract_niqe_params(sdist, path)
            except OSError as exc:  # read-only prefix: try the user's cache
                errors.append(f"{path}: {exc}")
        raise PermissionError(f"could not write NIQE's parameters anywhere: {'; '.join(errors)}")
