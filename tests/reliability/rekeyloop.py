"""Key rotation under SIGKILL: `python -m tests.reliability.rekeyloop DEVICE` rotates the passphrase of the LUKS2
header on DEVICE back and forth between two known passphrases (`FIRST` to `SECOND` and back), forever, through
`localdisk.crypt.Crypt.rotate`, as a node does at stage. The test (`tests/test_crypt_rotation.py`) kills its process
group (it and the cryptsetup it runs) at random moments and then demands that one of the two passphrases still
opens the header: a rotation cut off anywhere must never leave a volume nobody can open.

Each rotation first tries `SECOND` as the new passphrase with `FIRST` as the previous one, so a worker started after a
kill finishes whatever the killed one left (a header both open) before it turns the other way.
"""

from __future__ import annotations

import sys

import anyio

from localdisk.crypt import Crypt, Passphrase, Pbkdf
from localdisk.mounts import Mounter
from localdisk.runner import CommandRunner

FAST = Pbkdf(kind="pbkdf2", force_iterations=1000)
FIRST = Passphrase(b"rotation loop passphrase one 41c2")
SECOND = Passphrase(b"rotation loop passphrase two 9be0")


async def main(device: str) -> None:
    crypt = Crypt(Mounter(CommandRunner(default_timeout=120)), FAST)
    while True:
        await crypt.rotate(device, SECOND, FIRST)
        await crypt.rotate(device, FIRST, SECOND)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
