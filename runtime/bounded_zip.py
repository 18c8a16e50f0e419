"""Reading zip archives that came from someone else, with every byte counted as it comes out.

A zip's declared sizes (central directory, local headers) are the sender's word, so nothing here trusts
them: each member is decompressed in bounded chunks and refused the moment it passes its cap, and an
extraction stops the moment the total does. Never follows links; never writes outside `dest`.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import JobRejected

READ_CHUNK_BYTES = 1 << 20


def open_zip(source: bytes | Path) -> zipfile.ZipFile:
    """The archive, or JobRejected saying it is not a zip (instead of zipfile's own exceptions)."""
    try:
        return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        raise JobRejected("job archive is not a valid zip (zip the job folder, or use submit_job FOLDER)") from None
    except OSError as e:
        raise JobRejected(f"job archive cannot be read ({e.strerror or e})") from None


def _copy_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: BinaryIO, limit_bytes: int,
                 total_left: tuple[int, int] | None = None) -> int:
    """Decompress one member into `out`, at most `limit_bytes`; the bytes written. With `total_left`
    (bytes left, the whole archive's cap) the archive's total is capped too."""
    cap = limit_bytes if total_left is None else min(limit_bytes, total_left[0])
    written = 0
    try:
        with zf.open(info) as src:
            while chunk := src.read(min(READ_CHUNK_BYTES, cap - written + 1)):
                written += len(chunk)
                if written > cap and cap < limit_bytes and total_left is not None:
                    raise JobRejected(f"job archive expands to more than {total_left[1]} bytes")
                if written > cap:
                    raise JobRejected(f"job archive member '{info.filename[:200]}' is larger than {limit_bytes} "
                                      "bytes decompressed")
                out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as e:
        raise JobRejected(f"job archive member '{info.filename[:200]}' is damaged ({e})") from None
    return written


def read_member(zf: zipfile.ZipFile, name: str, limit_bytes: int) -> bytes:
    """One member's bytes, refused (JobRejected) past `limit_bytes` decompressed."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise JobRejected(f"job folder has no file '{name[:200]}'") from None
    buf = io.BytesIO()
    _copy_capped(zf, info, buf, limit_bytes)
    return buf.getvalue()


def is_plain_path(name: str) -> bool:
    """A relative path in its one written form: no '..', no '.' or empty parts. `custom/./learner.py` beside
    `custom/learner.py` hashed as two files and extracted as one, the last written: a reviewer reading the
    first approved the second."""
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and str(p) == name.rstrip("/") and "\\" not in name


def _is_unsafe(info: zipfile.ZipInfo) -> bool:
    return not is_plain_path(info.filename) or (info.external_attr >> 16) & 0o170000 == 0o120000


def check_entries(zf: zipfile.ZipFile, max_files: int, member_limit_bytes: int | None = None,
                  total_limit_bytes: int | None = None) -> list[zipfile.ZipInfo]:
    """The archive's entries; JobRejected for too many, an absolute path, '..' or a link, and (when limits
    are given) a member or a total that *declares* more than its cap. Declared sizes can lie: extracting
    checks what really comes out; this refuses at once what could never be extracted."""
    infos = zf.infolist()
    if len(infos) > max_files:
        raise JobRejected(f"job archive holds {len(infos)} files (limit {max_files})")
    for info in infos:
        if _is_unsafe(info):
            raise JobRejected(f"job archive entry '{info.filename[:200]}' is unsafe")
        if member_limit_bytes is not None and info.file_size > member_limit_bytes:
            raise JobRejected(f"job archive member '{info.filename[:200]}' is larger than {member_limit_bytes} "
                              "bytes decompressed")
    if total_limit_bytes is not None and sum(i.file_size for i in infos) > total_limit_bytes:
        raise JobRejected(f"job archive expands to more than {total_limit_bytes} bytes")
    return infos


def extract_capped(zf: zipfile.ZipFile, dest: Path, max_files: int, member_limit_bytes: int,
                   total_limit_bytes: int) -> None:
    """Unzip into `dest`, refusing absolute paths, '..', links, too many files, and any member or total
    that decompresses past its cap (checked while writing, whatever the archive declares)."""
    infos = check_entries(zf, max_files)
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for info in infos:
        target = dest / info.filename
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            total += _copy_capped(zf, info, out, member_limit_bytes, (total_limit_bytes - total, total_limit_bytes))
