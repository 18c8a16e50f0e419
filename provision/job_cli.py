"""`fedkit job ...`: commands about a job folder, for admins and site IT.

    fedkit job hash FOLDER     the code hash a site approves in local/job_policy.yml (code: approved_hashes)

The hash is computed exactly as the admin console computes it at submit (over the zip it uploads) and as
a site computes it over the archive it receives: runtime.job_code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from runtime.errors import ConfigError
from runtime.job_code import code_hash_of_zip
from runtime.job_spec import zip_folder

job_app = typer.Typer(help="Job folders: the code hash sites approve.", pretty_exceptions_show_locals=False)


@job_app.command("hash")
def hash_cmd(folder: Annotated[Path, typer.Argument(help="a job folder (meta.yml, configs, custom/)")]) -> None:
    """Print the job's code hash: every file of the folder by path and content (not __pycache__).

    `--set` overrides at submit are not part of it; show_job lists them next to the hash."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a job folder")
    typer.echo(f"{code_hash_of_zip(zip_folder(folder))}  {folder}")
