"""
The application file for C{twistd -ny tap.py}: the transcoding service,
configured from C{TRANSCODER_*} environment variables, one per option of
C{transcoder serve} (C{TRANSCODER_LISTEN}, C{TRANSCODER_DATA_DIR},
C{TRANSCODER_WORKERS}, ...).  See docs/deployment.md.

    TRANSCODER_LISTEN=tcp:8080 TRANSCODER_DATA_DIR=/var/lib/transcoder twistd -ny tap.py
"""

import os
import sys

from twisted.application.service import Application
from twisted.python import usage

from transcoder._env import options_from_env
from transcoder.service import makeService

try:
    _options = options_from_env(os.environ)
except usage.UsageError as _e:
    sys.stderr.write(f"tap.py: {_e}\n")
    raise SystemExit(2) from None

application = Application("transcoder")
makeService(_options).setServiceParent(application)
