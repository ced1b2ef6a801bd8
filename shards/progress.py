"""Progress bars that suit where they are written: a redrawn bar on a terminal, plain lines in a file.

A bar redrawn with carriage returns fills a log (CI, `scripts/demo.sh > log`, a SLURM .out file) with
thousands of copies of itself. Off a terminal, `Progress` writes one line every LOG_EVERY seconds
and one when it ends; `disable=True` (the commands' -q) writes nothing.
"""

import sys
import time

from tqdm import tqdm

LOG_EVERY = 30.0  # seconds between lines off a terminal


class Progress(tqdm):
    """tqdm, with plain lines instead of redraws when its file is not a terminal."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", sys.stderr)
        isatty = getattr(kwargs["file"], "isatty", None)
        self.plain = not (isatty and isatty())
        self._logged_at, self._logged_n = time.monotonic(), 0
        if self.plain:  # the last line is logged by close(); tqdm's own leave/clear would write \r or \n
            kwargs.update(dynamic_ncols=False, ncols=100, leave=False, ascii=True)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if not self.plain:
            return super().display(msg, pos)
        if msg == "" or self.n == self._logged_n or time.monotonic() - self._logged_at < LOG_EVERY:
            return False  # nothing to clear in a file, nothing new, or too soon
        self._log()
        return True

    def close(self):
        if self.plain and not self.disable and self.n != self._logged_n:
            self._log()  # the last state, as one line
        super().close()

    def _log(self):
        self._logged_at, self._logged_n = time.monotonic(), self.n
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
