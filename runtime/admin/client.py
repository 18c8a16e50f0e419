"""AdminClient: the admin service's calls as plain async methods returning Python data. Every call has
a deadline (COMMAND_TIMEOUT_S, or TRANSFER_TIMEOUT_S for uploads and downloads)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from .. import kit_config as kc
from ..errors import CertificateError, FedkitError, JobRejected, ServerUnreachable
from ..job_code import CodeSignature, code_hash_of_zip, sign_code
from ..job_spec import load_job_folder, zip_folder
from ..procs import workspace
from ..proto import fedkit_pb2 as pb
from ..server_trust import refuse_revoked_server
from ..tls_diagnosis import diagnose
from ..transport import TlsFiles, admin_stub, call_errors, iter_chunks, open_channel
from .model_upload import model_to_send

COMMAND_TIMEOUT_S = 30.0
TRANSFER_TIMEOUT_S = 3600.0
DIAGNOSE_TIMEOUT_S = 10.0  # our own handshake, after gRPC's failed: how long it may take


class CommandFailed(FedkitError):
    """The server refused or could not carry out an admin command."""


class AdminClient:
    def __init__(self, kit: Path):
        startup = kit / kc.STARTUP
        self._kit = kit
        self.config = kc.load_model(startup / kc.ADMIN_CONFIG, kc.AdminKitConfig)
        self._tls = TlsFiles(startup / self.config.cert, startup / self.config.key, startup / self.config.root_ca)
        self._target = f"{self.config.server_host}:{self.config.admin_port}"
        self._channel = None
        self._stub = None

    async def __aenter__(self) -> AdminClient:
        self._channel = open_channel(self._tls, self.config.server_host, self.config.admin_port)
        self._stub = admin_stub(self._channel)
        try:  # no command goes to a server whose certificate lead IT has revoked
            await refuse_revoked_server(self._stub, self._tls, self.config.server_host, self.config.admin_port,
                                        workspace(self._kit))
        except (ServerUnreachable, CertificateError):
            await self._channel.close()
            # gRPC words a certificate either side refused as a network fault or a raw OpenSSL code: a handshake
            # of our own says which side's certificate is the problem
            diagnosis = await asyncio.to_thread(diagnose, self._tls, self.config.server_host,
                                                self.config.admin_port, DIAGNOSE_TIMEOUT_S, "this admin kit's")
            if diagnosis is not None and diagnosis.is_certificate_problem:
                raise CertificateError(f"connect: {diagnosis.message}") from None
            raise
        except BaseException:
            await self._channel.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def command(self, name: str, **args: Any) -> Any:
        with call_errors(name, self._target):
            reply = await self._stub.Command(pb.AdminRequest(command=name, args_json=json.dumps(args)),
                                             timeout=COMMAND_TIMEOUT_S)
        if not reply.ok:
            raise CommandFailed(reply.message)
        return json.loads(reply.data_json or "null")

    async def submit_job(self, folder: Path, overrides: list[str] | None = None,
                         progress: Callable[[int, int], None] | None = None, sign: bool = True,
                         initial_model: Path | None = None) -> dict[str, Any]:
        """Upload a job folder (zipped) with its overrides; `progress(bytes_sent, bytes_total)` follows it.
        With `sign`, the code hash goes with an ECDSA signature by this admin's key (for sites whose
        job_policy.yml accepts only code signed by named admins). `initial_model`: a safetensors file
        streamed from disk after the archive (a model too large for the archive), checked here first."""
        with unreadable_job_files(folder):
            load_job_folder(folder, overrides)  # fail here, before the upload, on a bad folder or override
            model = await asyncio.to_thread(model_to_send, initial_model) if initial_model else None
            archive = await asyncio.to_thread(zip_folder, folder)
        args: dict[str, Any] = {"folder": folder.name, "overrides": overrides or []}
        if sign:
            args["code_signature"] = (await asyncio.to_thread(self._sign, archive)).model_dump(mode="json")
        if model is not None:
            args["archive_bytes"] = len(archive)
            args["initial_model"] = {"file": model.path.name, "bytes": model.size_bytes, "sha256": model.sha256}
        header = pb.AdminRequest(command="submit_job", args_json=json.dumps(args))
        total = len(archive) + (model.size_bytes if model else 0)

        async def chunks() -> AsyncIterator[pb.UploadChunk]:
            yield pb.UploadChunk(header=header)
            sent = 0
            for piece in iter_chunks(archive):
                yield pb.UploadChunk(data=piece)
                sent += len(piece)
                if progress:
                    progress(sent, total)
            if model is not None:
                async for piece in model.chunks():
                    yield pb.UploadChunk(data=piece)
                    sent += len(piece)
                    if progress:
                        progress(sent, total)

        with call_errors("submit_job", self._target):
            reply = await self._stub.Upload(chunks(), timeout=TRANSFER_TIMEOUT_S)
        if not reply.ok:
            raise CommandFailed(reply.message)
        return json.loads(reply.data_json)

    def _sign(self, archive: bytes) -> CodeSignature:
        try:
            key_pem, cert_pem = self._tls.key.read_bytes(), self._tls.cert.read_bytes()
        except OSError as e:
            raise FedkitError(f"{e.filename}: cannot read ({e.strerror}); needed to sign the job's code") from None
        return sign_code(code_hash_of_zip(archive), key_pem, cert_pem)

    async def download_job(self, job_id: str, dest: Path, progress: Callable[[int, int], None] | None = None,
                           total_bytes: int = 0, keep_zip: bool = False) -> tuple[Path, int]:
        """Unpack the job's results (models, metrics, record, log lines) into DEST/<job_id>/ (and keep
        DEST/<job_id>.zip too with `keep_zip`); returns that folder and the bytes received.
        `progress(received, total_bytes)` follows the transfer (total_bytes 0: unknown). Nothing is left in
        DEST when the download is refused or breaks off: it arrives under hidden .part names first."""
        if not _JOB_ID.fullmatch(job_id):
            raise CommandFailed(f"'{job_id[:80]}' is not a job id (letters, digits, '.', '_', '-')")
        out, zip_path = dest / job_id, dest / f"{job_id}.zip"
        if dest.exists() and not dest.is_dir():
            raise FedkitError(f"cannot write results to {dest}: it is a file, not a folder")
        if out.exists():
            raise CommandFailed(f"{out} exists already; remove it or download into another folder")
        made = [p for p in (dest, *dest.parents) if not p.exists()]  # the folders made here, removed on failure
        try:
            dest.mkdir(parents=True, exist_ok=True)
            # fresh names, made here (O_EXCL): a link someone planted under a fixed .part name in a shared
            # results folder was followed, and the download written wherever it pointed
            fd, zip_name = tempfile.mkstemp(prefix=f".{job_id}.", suffix=".zip.part", dir=dest)
        except OSError as e:  # a file on the way (afile/sub), a place no one may write (/proc): before the server
            _remove_empty(made)
            raise _cannot_write(dest, e) from None
        part_zip, part_dir = Path(zip_name), Path(zip_name[:-len(".zip.part")] + ".part")
        received = 0
        try:
            with call_errors("download_job", self._target), os.fdopen(fd, "wb") as f:
                async for chunk in self._stub.Download(
                        pb.AdminRequest(command="download_job", args_json=json.dumps({"job_id": job_id})),
                        timeout=TRANSFER_TIMEOUT_S):
                    await asyncio.to_thread(f.write, chunk.data)
                    received += len(chunk.data)
                    if progress:
                        progress(received, total_bytes)
            part_dir.mkdir()  # beside the zip's unique name, so unique too; never one that exists already
            await asyncio.to_thread(_unzip, part_zip, part_dir)
            part_dir.rename(out)
            if keep_zip:
                part_zip.rename(zip_path)
        except BaseException as e:
            part_zip.unlink(missing_ok=True)
            await asyncio.to_thread(shutil.rmtree, part_dir, True)
            _remove_empty(made)
            if isinstance(e, OSError):  # DEST not writable, disk full: one line, not a traceback
                raise _cannot_write(dest, e) from None
            raise
        part_zip.unlink(missing_ok=True)
        return out, received


@contextlib.contextmanager
def unreadable_job_files(folder: Path) -> Iterator[None]:
    """A job folder's file that cannot be read (a dangling link, no permission) as a one-line JobRejected
    naming it: the job and model checks and the zipping below them let OSError through."""
    try:
        yield
    except OSError as e:
        raise JobRejected(f"{e.filename or folder}: cannot read ({e.strerror or e}); job not submitted") from None


def _cannot_write(dest: Path, e: OSError) -> FedkitError:
    return FedkitError(f"cannot write results to {dest}: {(e.strerror or str(e)).lower()}")


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed download made (deepest first), as long as nothing else was put in them."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue  # mkdir failed before it
        except OSError:
            return  # something else is in it


_JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def _unzip(zip_path: Path, out: Path) -> None:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(out)
    except zipfile.BadZipFile:
        raise CommandFailed(f"{zip_path}: the download is incomplete or damaged; run download_job again") from None
