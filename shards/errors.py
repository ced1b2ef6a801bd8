"""The project's exception hierarchy: every domain error is one readable line."""


class ELRError(Exception):
    """Base class: the CLI turns these into `Error: <message>` and exit 1."""


class SourceLayoutError(ELRError):
    """The source tree does not have the seed's layout (missing folder, empty phase...)."""


class BadVideoError(ELRError):
    """One video's files are unreadable or disagree; carries the video for --on-error skip."""

    def __init__(self, class_name: str, video: str, path: str, problem: str):
        self.class_name, self.video, self.path, self.problem = class_name, video, path, problem
        super().__init__(f"video {class_name}/{video}: {path}: {problem}")

    def __reduce__(self):  # rebuilt from its fields when it crosses from a dask worker
        return (BadVideoError, (self.class_name, self.video, self.path, self.problem))


class OutputExistsError(ELRError):
    """Refusing to overwrite or mix with an existing shard set."""


class ManifestError(ELRError):
    """manifest.json is missing, unreadable, or of an unknown format version."""


class ShardCorruptError(ELRError):
    """A shard's bytes or samples do not match what the manifest promises."""


class RemoteError(ELRError):
    """A remote shard set cannot be read (after retries, where retrying can help)."""
