"""`loracommons download URL --out DIR [--version N|latest] [--pin FINGERPRINT] [--replace]`.

Works on a download-only install: nothing here imports torch or flwr. Every string that came
from the server is escaped before Rich sees it (a project id `[link=...]` stays text).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from loracommons.client.download import download as download_release
from loracommons.client.trust import DownloadError

_out = Console()
_err = Console(stderr=True)


def _note(line: str) -> None:
    _err.print(f"[yellow]note:[/] {escape(line)}", highlight=False, soft_wrap=True)


def download(
    url: str = typer.Argument(..., help="Coordinator HTTP address, e.g. http://host:8000"),
    out: Path = typer.Option(..., "--out", help="Folder to install the adapter into (replaced atomically)."),
    version: str = typer.Option("latest", "--version", help="Release number, or 'latest'."),
    pin: str = typer.Option(None, "--pin", help="Coordinator key fingerprint (hex, the full 64 digits or at "
                            "least 32, dashes ok); default: the key stored on first use."),
    replace: bool = typer.Option(False, "--replace", help="Allow another project or coordinator key than "
                                 "the one pinned at URL or installed in --out (refused without it)."),
) -> None:
    """Download a community adapter and verify it against the pinned coordinator key."""
    try:
        result = download_release(url, out, version=version, pin=pin, progress=True, notify=_note,
                                  replace=replace)
    except DownloadError as exc:
        _err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    seen = f"; chain verified from v{result.previous_version}" if result.previous_version else ""
    files = ", ".join(f"{n} ({s} bytes)" for n, s in result.files.items())
    for line in (
        f"release v{result.version} (round {result.round}) of project {result.project_id} "
        f"installed in {result.out_dir}",
        f"signed by coordinator key {result.fingerprint}{seen}",
        f"manifest {result.manifest_digest}; files: {files}",
        f"load it with: PeftModel.from_pretrained(base_model, {str(result.out_dir)!r})",
    ):
        _out.print(escape(line), highlight=False, soft_wrap=True)
