"""filesrv: move big files between your own hosts, resumable and verified end to end."""

__version__ = "0.1.0"

__all__ = ["Client", "TransferResult", "FilesrvError", "__version__"]


def __getattr__(name: str):  # lazy: `filesrv serve` and the CLI import only what they use
    if name in ("Client", "TransferResult"):
        from . import client
        return getattr(client, name)
    if name == "FilesrvError":
        from .errors import FilesrvError
        return FilesrvError
    raise AttributeError(name)
